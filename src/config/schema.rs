//! Serde structs exactly as the YAML is written; nothing here has defaults
//! applied or meaning checked (that is `validate.rs`).
//!
//! Every struct denies unknown keys. Numbers, booleans and durations also
//! accept strings, because `${VAR}` expansion always yields a string.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Top-level sections, in file order; `load.rs` deserializes each on its own
/// so that a mistake in one does not hide mistakes in the others.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "routing",
    "usage",
    "logging",
    "callers",
    "prices",
    "shadow",
    "shared_state",
    "openai_clients",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    #[serde(default)]
    pub auth_tokens: Option<Vec<AuthTokenEntry>>,
    pub admin_token: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub header_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub keepalive_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_connections: Option<usize>,
    pub cors: Option<CorsSection>,
    pub trusted_proxies: Option<Vec<String>>,
    pub tls: Option<TlsSection>,
}

/// `server.tls`: the listener's certificate chain and private key (PEM files).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// `server.cors`: which browser origins may call the gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    pub allow_origins: Option<Vec<String>>,
    pub allow_headers: Option<Vec<String>>,
}

/// `- "token"` or `- { name: "batch-jobs", token: "..." }`.
#[derive(Debug)]
pub enum AuthTokenEntry {
    Bare(String),
    Named { name: String, token: String },
}

impl<'de> Deserialize<'de> for AuthTokenEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bare(String),
            Map(BTreeMap<String, String>),
        }
        const SHAPE: &str = "expected a token string or { name: ..., token: ... }";
        match Raw::deserialize(d).map_err(|_| de::Error::custom(SHAPE))? {
            Raw::Bare(token) => Ok(AuthTokenEntry::Bare(token)),
            Raw::Map(mut map) => {
                let (name, token) = (map.remove("name"), map.remove("token"));
                if let Some(unknown) = map.keys().next() {
                    return Err(de::Error::custom(format!(
                        "unknown field `{unknown}`, expected one of `name`, `token`"
                    )));
                }
                match (name, token) {
                    (Some(name), Some(token)) => Ok(AuthTokenEntry::Named { name, token }),
                    // `{ token_file: ... }` without a name reads as a bare token.
                    (None, Some(token)) => Ok(AuthTokenEntry::Bare(token)),
                    _ => Err(de::Error::custom(SHAPE)),
                }
            }
        }
    }
}

/// The `routing` section; every client may repeat any of these keys.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_fallback_depth: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_num_list")]
    pub retry_on: Option<Vec<u16>>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_failures: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub cooldown: Option<Duration>,
    pub key_strategy: Option<KeyStrategy>,
    /// Global only: a client cannot repeat it.
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub probe_keys: Option<bool>,
    /// The whole request before response headers; routing-level only.
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub deadline: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub first_token_timeout: Option<Duration>,
    pub affinity: Option<AffinitySection>,
    pub balance: Option<Balance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    #[default]
    RoundRobin,
    Random,
    LeastUsed,
    /// The key with the most quota left by its upstream's last reading.
    Headroom,
}

/// `affinity: { from: ... }`; the form of `from` is checked by validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinitySection {
    pub from: String,
}

/// How clients of one priority share traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    WeightedRoundRobin,
    /// Power of two choices on a decaying average of time to first byte.
    Latency,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::WeightedRoundRobin => "weighted_round_robin",
            Balance::Latency => "latency",
        }
    }
}

impl KeyStrategy {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStrategy::RoundRobin => "round_robin",
            KeyStrategy::Random => "random",
            KeyStrategy::LeastUsed => "least_used",
            KeyStrategy::Headroom => "headroom",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSection {
    pub dir: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    pub level: Option<String>,
    pub dir: Option<String>,
    pub format: Option<LogFormat>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub access: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    pub name: String,
    pub base_url: String,
    /// The upstream's API: `openai` (default) or `anthropic`.
    pub api: Option<Api>,
    /// How the key is sent; default `bearer` (`x-api-key` for `anthropic`).
    pub auth: Option<AuthStyle>,
    /// `anthropic-version` sent to an `anthropic` client.
    pub anthropic_version: Option<String>,
    pub api_key: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    pub api_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub priority: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub weight: Option<u32>,
    pub model_match: ModelMatchSection,
    #[serde(default, deserialize_with = "lenient::fallback")]
    pub fallback: Option<Vec<String>>,
    pub upstream_model: Option<String>,
    pub special_prefix: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    pub stop: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_tokens: Option<u64>,
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    pub headers: Option<BTreeMap<String, String>>,
    /// Prices for this client's models, before the top-level table.
    pub prices: Option<BTreeMap<String, PriceSection>>,
    // routing.* overrides, spelled out: serde cannot deny unknown fields
    // through a flatten.
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub first_token_timeout: Option<Duration>,
    pub affinity: Option<AffinitySection>,
    pub balance: Option<Balance>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_fallback_depth: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_num_list")]
    pub retry_on: Option<Vec<u16>>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_failures: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub cooldown: Option<Duration>,
    pub key_strategy: Option<KeyStrategy>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub discover_models: Option<bool>,
}

impl ClientSection {
    /// The routing keys this client repeats, as a `RoutingSection` to merge.
    pub fn routing_overrides(&self) -> RoutingSection {
        RoutingSection {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            max_attempts: self.max_attempts,
            max_fallback_depth: self.max_fallback_depth,
            retry_on: self.retry_on.clone(),
            max_failures: self.max_failures,
            cooldown: self.cooldown,
            key_strategy: self.key_strategy,
            probe_keys: None,
            // One deadline per request, across clients: not per client.
            deadline: None,
            first_token_timeout: self.first_token_timeout,
            affinity: self.affinity.clone(),
            balance: self.balance,
        }
    }
}

/// `shared_state`: the Redis (or Valkey) that several instances share.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateSection {
    pub url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_duration")]
    pub timeout: Option<Duration>,
    pub on_outage: Option<OnOutage>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub replicas: Option<i64>,
    pub instance: Option<String>,
}

/// What an instance does while its shared state does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOutage {
    /// 503 `shared_state_unavailable` for every limited caller.
    Deny,
    /// Admit without limits.
    Allow,
    /// Enforce each limit divided by `replicas`, in process.
    #[default]
    LocalShare,
}

impl OnOutage {
    pub fn as_str(self) -> &'static str {
        match self {
            OnOutage::Deny => "deny",
            OnOutage::Allow => "allow",
            OnOutage::LocalShare => "local_share",
        }
    }
}

/// The API a client speaks, which decides the endpoints it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Api {
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }
}

/// The header a client's key goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`.
    #[default]
    #[serde(rename = "bearer")]
    Bearer,
    /// `api-key: <key>` (Azure's form).
    #[serde(rename = "api-key")]
    ApiKey,
    /// `x-api-key: <key>` (Anthropic's form).
    #[serde(rename = "x-api-key")]
    XApiKey,
    /// No credential; the client needs no key.
    #[serde(rename = "none")]
    None,
}

impl AuthStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStyle::Bearer => "bearer",
            AuthStyle::ApiKey => "api-key",
            AuthStyle::XApiKey => "x-api-key",
            AuthStyle::None => "none",
        }
    }
}

/// One entry of `callers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerSection {
    pub name: String,
    pub token: Option<String>,
    pub token_sha256: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    pub models: Option<Vec<String>>,
    pub limits: Option<LimitsSection>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub max_tokens_default: Option<i64>,
}

/// A caller's `limits`; signed here so that a negative value gets its own
/// message from validation rather than a type error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub rpm: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub tpm: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_num")]
    pub concurrency: Option<i64>,
    pub budget_usd: Option<BudgetSection>,
    pub budget_tokens: Option<BudgetSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    #[serde(deserialize_with = "lenient::number")]
    pub amount: f64,
    pub per: Per,
}

/// The period a budget counts: a UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    Day,
    Month,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Per::Day => "day",
            Per::Month => "month",
        }
    }
}

/// One `shadow` entry: mirror a share of matching requests to a client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSection {
    pub client: String,
    #[serde(deserialize_with = "lenient::number")]
    pub percent: f64,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    pub models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_number")]
    pub max_usd_per_day: Option<f64>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSection {
    #[serde(deserialize_with = "lenient::number")]
    pub input: f64,
    #[serde(default, deserialize_with = "lenient::opt_number")]
    pub cached_input: Option<f64>,
    #[serde(deserialize_with = "lenient::number")]
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMatchSection {
    #[serde(rename = "type")]
    pub kind: MatchKind,
    #[serde(deserialize_with = "lenient::string_list")]
    pub value: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    #[default]
    Exact,
    Keyword,
    Regex,
}

impl fmt::Display for MatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MatchKind::Exact => "exact",
            MatchKind::Keyword => "keyword",
            MatchKind::Regex => "regex",
        })
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration `{text}`: expected e.g. \"250ms\", \"30s\", \"5m\", \"1h\" or seconds"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration `{text}`: unit must be ms, s, m or h"
            ))
        }
    };
    Ok(d)
}

/// Deserializers that take a value or its string form.
mod lenient {
    use super::*;
    use std::str::FromStr;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr<T> {
        Num(T),
        Str(String),
    }

    pub fn opt_num<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + FromStr,
    {
        match Option::<NumOrStr<T>>::deserialize(d) {
            Ok(None) => Ok(None),
            Ok(Some(NumOrStr::Num(n))) => Ok(Some(n)),
            Ok(Some(NumOrStr::Str(s))) => s.trim().parse().map(Some).map_err(|_| {
                de::Error::custom(format!("expected a whole number in range, got `{s}`"))
            }),
            Err(_) => Err(de::Error::custom("expected a whole number in range")),
        }
    }

    /// A number (whole or not), or its string form.
    pub fn number<'de, D>(d: D) -> Result<f64, D::Error>
    where
        D: Deserializer<'de>,
    {
        opt_number(d)?.ok_or_else(|| de::Error::custom("expected a number"))
    }

    pub fn opt_number<'de, D>(d: D) -> Result<Option<f64>, D::Error>
    where
        D: Deserializer<'de>,
    {
        match Option::<NumOrStr<f64>>::deserialize(d) {
            Ok(None) => Ok(None),
            Ok(Some(NumOrStr::Num(n))) if n.is_finite() => Ok(Some(n)),
            Ok(Some(NumOrStr::Str(s))) => match s.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(Some(n)),
                _ => Err(de::Error::custom(format!("expected a number, got `{s}`"))),
            },
            _ => Err(de::Error::custom("expected a number")),
        }
    }

    pub fn opt_num_list<'de, D>(d: D) -> Result<Option<Vec<u16>>, D::Error>
    where
        D: Deserializer<'de>,
    {
        let items = Option::<Vec<NumOrStr<u16>>>::deserialize(d)
            .map_err(|_| de::Error::custom("expected a list of HTTP status codes"))?;
        items
            .map(|items| {
                items
                    .into_iter()
                    .map(|item| match item {
                        NumOrStr::Num(n) => Ok(n),
                        NumOrStr::Str(s) => s.trim().parse().map_err(|_| {
                            de::Error::custom(format!("expected an HTTP status code, got `{s}`"))
                        }),
                    })
                    .collect()
            })
            .transpose()
    }

    pub fn opt_bool<'de, D>(d: D) -> Result<Option<bool>, D::Error>
    where
        D: Deserializer<'de>,
    {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum BoolOrStr {
            Bool(bool),
            Str(String),
        }
        match Option::<BoolOrStr>::deserialize(d) {
            Ok(None) => Ok(None),
            Ok(Some(BoolOrStr::Bool(b))) => Ok(Some(b)),
            Ok(Some(BoolOrStr::Str(s))) => parse_bool(&s)
                .map(Some)
                .ok_or_else(|| de::Error::custom(format!("expected true or false, got `{s}`"))),
            Err(_) => Err(de::Error::custom("expected true or false")),
        }
    }

    fn parse_bool(s: &str) -> Option<bool> {
        match s.trim() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => None,
        }
    }

    pub fn opt_duration<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
    where
        D: Deserializer<'de>,
    {
        match Option::<NumOrStr<u64>>::deserialize(d) {
            Ok(None) => Ok(None),
            Ok(Some(NumOrStr::Num(n))) => Ok(Some(Duration::from_secs(n))),
            Ok(Some(NumOrStr::Str(s))) => parse_duration(&s).map(Some).map_err(de::Error::custom),
            Err(_) => Err(de::Error::custom(
                "expected a duration such as \"250ms\", \"30s\", \"5m\", \"1h\" or seconds",
            )),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    pub fn string_list<'de, D>(d: D) -> Result<Vec<String>, D::Error>
    where
        D: Deserializer<'de>,
    {
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(s)) => Ok(vec![s]),
            Ok(OneOrMany::Many(v)) => Ok(v),
            Err(_) => Err(de::Error::custom("expected a string or a list of strings")),
        }
    }

    pub fn opt_string_list<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
    where
        D: Deserializer<'de>,
    {
        match Option::<OneOrMany>::deserialize(d) {
            Ok(None) => Ok(None),
            Ok(Some(OneOrMany::One(s))) => Ok(Some(vec![s])),
            Ok(Some(OneOrMany::Many(v))) => Ok(Some(v)),
            Err(_) => Err(de::Error::custom("expected a string or a list of strings")),
        }
    }

    /// `fallback`: a model name, a list of them, or `false`/null for none.
    pub fn fallback<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
    where
        D: Deserializer<'de>,
    {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Fallback {
            Off(bool),
            One(String),
            Many(Vec<String>),
        }
        match Option::<Fallback>::deserialize(d) {
            Ok(None) | Ok(Some(Fallback::Off(false))) => Ok(None),
            Ok(Some(Fallback::Off(true))) => Err(de::Error::custom(
                "fallback must be a model name, a list of model names, or false",
            )),
            Ok(Some(Fallback::One(s))) if parse_bool(&s) == Some(false) => Ok(None),
            Ok(Some(Fallback::One(s))) => Ok(Some(vec![s])),
            Ok(Some(Fallback::Many(v))) => Ok(Some(v)),
            Err(_) => Err(de::Error::custom(
                "fallback must be a model name, a list of model names, or false",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
    }
}
