//! The config file: read → expand `${VAR}` → parse → validate → [`Config`].
//!
//! Owns the schema and every config diagnostic. Knows no HTTP and builds no
//! routing state; `routing::RoutingTable::build` takes a [`Config`] from here.

pub mod effective;
pub mod env;
pub mod load;
pub mod prices;
pub mod schema;
pub mod secret_files;
pub mod source_map;
pub mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;

pub use load::{load, load_str, LoadError, Loaded};
pub use prices::{Price, PriceTable};
pub use schema::{Api, AuthStyle, KeyStrategy, LogFormat, MatchKind, Per};

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
    pub clients: Vec<ClientConfig>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One problem found in a config file, printed as `PATH:LINE:COL: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Warning => "warning: ",
            Severity::Error => "",
        };
        write!(
            f,
            "{}:{}:{}: {}{}",
            self.file, self.line, self.col, level, self.message
        )
    }
}
