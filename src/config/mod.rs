//! The config file: read → expand `${VAR}` → parse → validate → [`Config`].
//!
//! Owns the schema and every config diagnostic. Knows no HTTP and builds no
//! routing state; `routing::RoutingTable::build` takes a [`Config`] from here.

pub mod diags;
pub mod effective;
pub mod env;
pub mod load;
pub mod matcher;
pub mod prices;
pub mod schema;
pub mod secret_files;
pub mod source_map;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;

pub use diags::{Diagnostic, Severity};
pub use load::{load, load_str, LoadError, Loaded};
pub use prices::{Price, PriceTable};
pub use schema::{Api, AuthStyle, Balance, KeyStrategy, LogFormat, MatchKind, OnOutage, Per};

use crate::secret::Secret;

/// A valid config with every default applied and every path resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub routing: RoutingPolicy,
    pub usage: UsageConfig,
    pub logging: LoggingConfig,
    /// Every known token: `callers` first, then `server.auth_tokens` (as
    /// callers without limits).
    pub callers: Vec<CallerConfig>,
    /// The top-level `prices`.
    pub prices: PriceTable,
    /// Requests mirrored to other clients.
    pub shadow: Vec<ShadowConfig>,
    pub clients: Vec<ClientConfig>,
    /// `None`: this instance keeps its callers' state to itself.
    pub shared_state: Option<SharedStateConfig>,
    /// The files this config was made from besides the config file itself
    /// (secret files, `server.tls` cert and key): the reload watcher follows
    /// them, so a rotated secret or a renewed certificate is read again.
    pub read_files: Vec<std::path::PathBuf>,
}

/// The Redis (or Valkey) several instances share callers' limits, budgets
/// and key cooldowns through.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedStateConfig {
    /// The whole URL, password included: only the connection sees it.
    pub url: Secret,
    /// `host:port`, for logs and `check-keys`.
    pub address: String,
    /// The longest any call to it may take.
    pub timeout: Duration,
    pub on_outage: OnOutage,
    /// `local_share` enforces each limit divided by this.
    pub replicas: u32,
    /// This instance's id; `None`: host name and process id, chosen at start.
    pub instance: Option<String>,
}

/// Mirror `percent` of the matching non-stream requests to `client`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    pub client: String,
    /// 0 to 100.
    pub percent: f64,
    /// `*` globs; `None`: every model.
    pub models: Option<Vec<String>>,
    /// Mirroring stops for the UTC day once this is spent (nano-dollars).
    pub max_nanos_per_day: Option<i64>,
}

impl ShadowConfig {
    pub fn matches(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| prices::glob_match(g, model)))
    }
}

/// An application allowed to use the gateway: who it is, what it may use,
/// how fast and how much.
#[derive(Debug, Clone)]
pub struct CallerConfig {
    /// The usage row's `caller`; for a bare `auth_tokens` entry,
    /// `token-` and 8 hex digits of the token's SHA-256.
    pub name: String,
    /// SHA-256 of the bearer token: the config may hold only this.
    pub token_sha256: [u8; 32],
    /// `*` globs of the model names it may ask for; `None`: every model.
    pub models: Option<Vec<String>>,
    pub limits: CallerLimits,
    /// Completion tokens reserved when a request names no cap.
    pub max_tokens_default: u64,
}

impl CallerConfig {
    /// Whether the caller may ask for `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| prices::glob_match(g, model)))
    }
}

/// A caller's limits; `None`: no such limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallerLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
    /// In nano-dollars.
    pub budget_usd: Option<Budget>,
    /// In tokens.
    pub budget_tokens: Option<Budget>,
}

impl CallerLimits {
    pub fn is_empty(&self) -> bool {
        *self == CallerLimits::default()
    }

    /// Each limit divided by `replicas` (rounded down, at least 1): this
    /// instance's share while the shared state is out.
    pub fn share(&self, replicas: u32) -> CallerLimits {
        let n = u64::from(replicas.max(1));
        let part = |v: u64| (v / n).max(1);
        let budget = |b: Budget| Budget {
            amount: (b.amount.max(0) as u64 / n) as i64,
            per: b.per,
        };
        CallerLimits {
            rpm: self.rpm.map(part),
            tpm: self.tpm.map(part),
            concurrency: self.concurrency.map(|c| (u64::from(c) / n).max(1) as u32),
            budget_usd: self.budget_usd.map(budget),
            budget_tokens: self.budget_tokens.map(budget),
        }
    }
}

/// An amount (tokens, or nano-dollars) per UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub amount: i64,
    pub per: Per,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub auth_tokens: Vec<AuthToken>,
    pub admin_token: Option<Secret>,
    pub max_body_bytes: u64,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no CORS headers, and `OPTIONS` gets 405.
    pub cors: Option<Cors>,
    /// Peers whose `X-Forwarded-For` names the caller (access log only).
    pub trusted_proxies: Vec<IpNet>,
    /// `None`: the listener speaks plain HTTP.
    pub tls: Option<ListenerTls>,
}

/// `server.tls`, read and checked: the certificate chain and the private
/// key that matches it, as read from the files at this load.
#[derive(Clone)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: std::sync::Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for ListenerTls {
    // The paths only: nothing of the key, not even through rustls' types.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// An address block: `10.0.0.0/8`, or one address (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or one with `/n`.
    pub fn parse(text: &str) -> Option<IpNet> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 caller on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `server.cors`, checked: origins as browsers send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `scheme://host[:port]`, lowercased; `*` allows any origin.
    pub allow_origins: Vec<String>,
    /// Request headers a browser may send, lowercased; `None`: whatever
    /// the preflight asks for.
    pub allow_headers: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct AuthToken {
    /// Goes to the usage store's `caller` column; a bare token's is derived
    /// from its redacted id (`token-1a2b3c4d`).
    pub name: String,
    pub token: Secret,
}

/// The `routing.*` settings, global or merged with a client's overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPolicy {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_attempts: u32,
    pub max_fallback_depth: u32,
    pub retry_on: Vec<u16>,
    pub max_failures: u32,
    pub cooldown: Duration,
    pub key_strategy: KeyStrategy,
    /// Keys cooled by 401/403 come back after a background probe succeeds.
    pub probe_keys: bool,
    /// Bounds all attempts, fallbacks and waits before response headers.
    pub deadline: Option<Duration>,
    /// Bounds a stream's wait for its first body byte after its headers.
    pub first_token_timeout: Option<Duration>,
    pub affinity: Option<Affinity>,
    pub balance: Balance,
}

/// Where a request's affinity value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    Header(HeaderName),
    BodyUser,
    BodyPromptCacheKey,
    Caller,
}

impl Affinity {
    /// `header:NAME`, `body:user`, `body:prompt_cache_key` or `caller`.
    pub fn parse(text: &str) -> Result<Affinity, String> {
        let shapes = "expected `header:NAME`, `body:user`, `body:prompt_cache_key` or `caller`";
        match text.trim() {
            "body:user" => Ok(Affinity::BodyUser),
            "body:prompt_cache_key" => Ok(Affinity::BodyPromptCacheKey),
            "caller" => Ok(Affinity::Caller),
            t => match t.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Affinity::Header)
                    .map_err(|_| format!("affinity.from: `{name}` is not a valid header name")),
                None => Err(format!("affinity.from: unknown form `{t}`: {shapes}")),
            },
        }
    }

    /// The form as written in the config.
    pub fn describe(&self) -> String {
        match self {
            Affinity::Header(n) => format!("header:{n}"),
            Affinity::BodyUser => "body:user".to_owned(),
            Affinity::BodyPromptCacheKey => "body:prompt_cache_key".to_owned(),
            Affinity::Caller => "caller".to_owned(),
        }
    }
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        RoutingPolicy {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            max_attempts: 6,
            max_fallback_depth: 3,
            retry_on: vec![429, 500, 502, 503, 504],
            max_failures: 3,
            cooldown: Duration::from_secs(60),
            key_strategy: KeyStrategy::RoundRobin,
            probe_keys: true,
            deadline: None,
            first_token_timeout: None,
            affinity: None,
            balance: Balance::WeightedRoundRobin,
        }
    }
}

impl RoutingPolicy {
    /// This policy with every key the section sets replaced.
    pub fn merged(&self, o: &schema::RoutingSection) -> RoutingPolicy {
        RoutingPolicy {
            connect_timeout: o.connect_timeout.unwrap_or(self.connect_timeout),
            request_timeout: o.request_timeout.unwrap_or(self.request_timeout),
            idle_timeout: o.idle_timeout.unwrap_or(self.idle_timeout),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            max_fallback_depth: o.max_fallback_depth.unwrap_or(self.max_fallback_depth),
            retry_on: o.retry_on.clone().unwrap_or_else(|| self.retry_on.clone()),
            max_failures: o.max_failures.unwrap_or(self.max_failures),
            cooldown: o.cooldown.unwrap_or(self.cooldown),
            key_strategy: o.key_strategy.unwrap_or(self.key_strategy),
            probe_keys: o.probe_keys.unwrap_or(self.probe_keys),
            deadline: o.deadline.or(self.deadline),
            first_token_timeout: o.first_token_timeout.or(self.first_token_timeout),
            // An unknown form is reported by validation, which rejects the file.
            affinity: match &o.affinity {
                Some(a) => Affinity::parse(&a.from).ok(),
                None => self.affinity.clone(),
            },
            balance: o.balance.unwrap_or(self.balance),
        }
    }

    pub fn retries(&self, status: u16) -> bool {
        self.retry_on.contains(&status)
    }
}

#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub dir: PathBuf,
    pub enabled: bool,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub level: String,
    pub dir: Option<PathBuf>,
    pub format: LogFormat,
    /// One `info` line per request (`logging.access`).
    pub access: bool,
}

/// Default: a client of no name matching nothing, for building one from
/// the parts that matter (diffing a running daemon's effective config).
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    pub name: String,
    /// Without a trailing slash; requests go to `base_url + "/" + endpoint`.
    pub base_url: String,
    /// `openai` (default) or `anthropic`: which endpoints it serves.
    pub api: Api,
    /// How keys are sent, with the API's default applied.
    pub auth: AuthStyle,
    /// `anthropic-version` for an `anthropic` client.
    pub anthropic_version: String,
    /// Deduplicated, in file order; never empty (`auth: none`: one empty
    /// placeholder, never sent).
    pub keys: Vec<Secret>,
    pub priority: i64,
    pub weight: u32,
    pub model_match: MatchRule,
    /// Models to route to when every candidate failed; empty for none.
    pub fallback: Vec<String>,
    pub upstream_model: Option<String>,
    pub special_prefix: Option<String>,
    pub stop: Option<Vec<String>>,
    pub max_tokens: Option<u64>,
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// This client's own prices, looked up before the top-level table.
    pub prices: PriceTable,
    pub policy: RoutingPolicy,
    /// List the upstream's own model names that `model_match` matches
    /// in `/v1/models` (fetched at start and on reload).
    pub discover_models: bool,
}

/// A client's `model_match`, with regexes compiled and anchored to the whole name.
#[derive(Debug, Clone, Default)]
pub struct MatchRule {
    pub kind: MatchKind,
    pub values: Vec<String>,
    pub regexes: Vec<Regex>,
}

impl MatchRule {
    pub fn matches(&self, model: &str) -> bool {
        match self.kind {
            MatchKind::Exact => self.values.iter().any(|v| v == model),
            MatchKind::Keyword => self.values.iter().any(|v| model.contains(v.as_str())),
            MatchKind::Regex => self.regexes.iter().any(|r| r.is_match(model)),
        }
    }
}
