//! Every check of a parsed config, with line and column, and the defaults.
//!
//! Collects all errors and warnings instead of stopping at the first, then
//! builds the [`Config`] only from sections that deserialized.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::load::Diags;
use super::prices::{glob_match, Price, PriceTable, NANOS_PER_USD};
use super::schema::{self, Api, AuthStyle, AuthTokenEntry, ClientSection, MatchKind};
use super::source_map::SourceMap;
use super::{
    AuthToken, Budget, CallerConfig, CallerLimits, ClientConfig, Config, LoggingConfig, MatchRule,
    RoutingPolicy, ServerConfig, UsageConfig,
};
use crate::routing::matcher;
use crate::secret::{self, Secret};

/// Completion tokens reserved for a request that names no cap, unless a
/// caller sets its own `max_tokens_default`.
pub const MAX_TOKENS_DEFAULT: u64 = 4096;

/// Each section as deserialized (defaults when absent); `None` where it had
/// an error already reported.
pub struct Sections {
    pub server: Option<schema::ServerSection>,
    pub routing: Option<schema::RoutingSection>,
    pub usage: Option<schema::UsageSection>,
    pub logging: Option<schema::LoggingSection>,
    pub prices: Option<BTreeMap<String, schema::PriceSection>>,
    /// `(path, caller)` per list item.
    pub callers: Vec<(String, Option<schema::CallerSection>)>,
    /// `(path, client)` per list item.
    pub clients: Vec<(String, Option<ClientSection>)>,
}

impl Default for Sections {
    fn default() -> Self {
        Sections {
            server: Some(Default::default()),
            routing: Some(Default::default()),
            usage: Some(Default::default()),
            logging: Some(Default::default()),
            prices: Some(Default::default()),
            callers: Vec::new(),
            clients: Vec::new(),
        }
    }
}

/// The `anthropic-version` an `anthropic` client is sent unless it sets one.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

const HEADERS_NOT_SETTABLE: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

/// Checks everything and builds the config. Returns `None` only when some
/// section could not be read; errors found here go to `diags`.
pub fn validate(
    sections: Sections,
    base_dir: &Path,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<Config> {
    let s = sections;
    let any_missing = s.server.is_none()
        || s.routing.is_none()
        || s.usage.is_none()
        || s.logging.is_none()
        || s.prices.is_none()
        || s.callers.iter().any(|(_, c)| c.is_none());
    let prices = price_table(
        s.prices.as_ref().unwrap_or(&Default::default()),
        "prices",
        map,
        diags,
    );
    let server = server(s.server.as_ref().unwrap_or(&Default::default()), map, diags);
    let routing = routing(
        s.routing.as_ref().unwrap_or(&Default::default()),
        "routing",
        map,
        diags,
    );
    let usage = usage(s.usage.as_ref().unwrap_or(&Default::default()), base_dir);
    let logging = logging(
        s.logging.as_ref().unwrap_or(&Default::default()),
        base_dir,
        map,
        diags,
    );

    if s.clients.is_empty() && !diags.has_errors() {
        diags.error_at(
            map.value("openai_clients"),
            "`openai_clients` is empty: list at least one upstream client",
        );
    }
    let mut clients = Vec::new();
    let mut seen_names: HashMap<String, String> = HashMap::new();
    let mut all_valid = true;
    for (path, section) in &s.clients {
        let Some(section) = section else {
            all_valid = false;
            continue;
        };
        if let Some(first) = seen_names.insert(section.name.clone(), path.clone()) {
            let first_pos = map.value(&format!("{first}.name"));
            diags.error_at(
                map.value(&format!("{path}.name")),
                format!(
                    "duplicate client name `{}` (first defined at line {})",
                    section.name, first_pos.line
                ),
            );
        }
        if let Some(client) = client(section, path, &routing, map, diags) {
            clients.push((path.clone(), client));
        } else {
            all_valid = false;
        }
    }
    // With a client missing, a target might have been matched by it: only
    // cycles among the valid clients are reported then.
    check_fallbacks(&clients, all_valid, map, diags);
    if all_valid {
        warn_unreachable_clients(&clients, map, diags);
    }
    let callers = callers(
        &s.callers, &server, &clients, &prices, all_valid, map, diags,
    );
    if !callers.is_empty() || server.listen.ip().is_loopback() {
        // Auth is on, or only this machine can connect.
    } else {
        diags.warn_at(
            map.value("server.listen"),
            format!(
                "auth is disabled (no server.auth_tokens) but listen address {} is not loopback: anyone who can reach it can spend your keys",
                server.listen
            ),
        );
    }
    if any_missing {
        return None;
    }
    Some(Config {
        server,
        routing,
        usage,
        logging,
        callers,
        prices,
        clients: clients.into_iter().map(|(_, c)| c).collect(),
    })
}

/// A `prices` table (top-level or a client's): every price a finite number
/// of at least 0.
fn price_table(
    entries: &BTreeMap<String, schema::PriceSection>,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) -> PriceTable {
    let mut out = Vec::new();
    for (model, p) in entries {
        let at = format!("{path}.{model}");
        if model.is_empty() {
            diags.error_at(map.key(&at), format!("{path}: a model name is empty"));
            continue;
        }
        let mut ok = true;
        for (field, v) in [
            ("input", Some(p.input)),
            ("cached_input", p.cached_input),
            ("output", Some(p.output)),
        ] {
            if v.is_some_and(|v| v < 0.0) {
                diags.error_at(
                    map.value(&format!("{at}.{field}")),
                    format!("{at}.{field}: a price cannot be negative"),
                );
                ok = false;
            }
        }
        if ok {
            out.push((
                model.clone(),
                Price {
                    input: p.input,
                    cached_input: p.cached_input.unwrap_or(p.input),
                    output: p.output,
                },
            ));
        }
    }
    PriceTable::new(out)
}

/// The price of `model` as `client` serves it: the name sent upstream, the
/// client's own table first.
pub fn price_of(client: &ClientConfig, top: &PriceTable, model: &str) -> Option<Price> {
    let sent = client.upstream_model.as_deref().unwrap_or(model);
    client.prices.get(sent).or_else(|| top.get(sent))
}

/// `callers`, then the `auth_tokens` as callers without limits: names and
/// tokens unique, limits positive, budgets in USD only over priced models.
#[allow(clippy::too_many_arguments)]
fn callers(
    sections: &[(String, Option<schema::CallerSection>)],
    server: &ServerConfig,
    clients: &[(String, ClientConfig)],
    prices: &PriceTable,
    clients_complete: bool,
    map: &SourceMap,
    diags: &mut Diags,
) -> Vec<CallerConfig> {
    let mut out: Vec<CallerConfig> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut tokens: HashMap<[u8; 32], String> = HashMap::new();
    let configs: Vec<&ClientConfig> = clients.iter().map(|(_, c)| c).collect();
    // Model names the config knows by name: exact matches and fallbacks.
    let known: Vec<&str> = configs
        .iter()
        .flat_map(|c| {
            let exact = (c.model_match.kind == MatchKind::Exact)
                .then_some(c.model_match.values.iter())
                .into_iter()
                .flatten();
            exact.chain(c.fallback.iter()).map(String::as_str)
        })
        .collect();
    let open_ended = configs
        .iter()
        .any(|c| c.model_match.kind != MatchKind::Exact);
    for (path, c) in sections {
        let Some(c) = c else { continue };
        let at = |key: &str| format!("{path}.{key}");
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
        {
            diags.error_at(
                map.value(&at("name")),
                format!(
                    "caller name `{}` may use only letters, digits, `_`, `.` and `-`",
                    c.name
                ),
            );
        }
        if let Some(first) = names.insert(c.name.clone(), path.clone()) {
            diags.error_at(
                map.value(&at("name")),
                format!(
                    "duplicate caller name `{}` (first defined at line {})",
                    c.name,
                    map.value(&format!("{first}.name")).line
                ),
            );
        }
        let digest = match (&c.token, &c.token_sha256) {
            (Some(_), Some(_)) => {
                diags.error_at(
                    map.key(&at("token_sha256")),
                    format!(
                        "caller `{}`: set `token` or `token_sha256`, not both",
                        c.name
                    ),
                );
                None
            }
            (None, None) => {
                diags.error_at(
                    map.key(path),
                    format!(
                        "caller `{}` has no token: set `token` or `token_sha256`",
                        c.name
                    ),
                );
                None
            }
            (Some(t), None) if t.is_empty() => {
                diags.error_at(
                    map.value(&at("token")),
                    format!("{path}.token: the token is empty"),
                );
                None
            }
            (Some(t), None) => check_no_control_chars(t, &at("token"), map, diags)
                .then(|| secret::sha256(t.as_bytes())),
            (None, Some(h)) => match parse_sha256(h) {
                Some(d) => Some(d),
                None => {
                    diags.error_at(
                        map.value(&at("token_sha256")),
                        format!("{path}.token_sha256: expected 64 hex digits (the SHA-256 of the token)"),
                    );
                    None
                }
            },
        };
        if let Some(d) = digest {
            if let Some(first) = tokens.insert(d, path.clone()) {
                diags.error_at(
                    map.value(&at("token")),
                    format!(
                        "caller `{}` has the same token as {first}: each caller needs its own",
                        c.name
                    ),
                );
            }
        }
        let limits = caller_limits(c.limits.as_ref(), &at("limits"), map, diags);
        let max_tokens_default = match c.max_tokens_default {
            None => MAX_TOKENS_DEFAULT,
            Some(n) if n > 0 => n as u64,
            Some(_) => {
                diags.error_at(
                    map.value(&at("max_tokens_default")),
                    format!("{path}.max_tokens_default must be at least 1"),
                );
                MAX_TOKENS_DEFAULT
            }
        };
        if let Some(models) = &c.models {
            for (i, g) in models.iter().enumerate() {
                let gpath = format!("{path}.models[{i}]");
                if g.is_empty() {
                    diags.error_at(map.value(&gpath), format!("{gpath}: a model name is empty"));
                    continue;
                }
                if !clients_complete {
                    continue;
                }
                let named = known.iter().any(|m| glob_match(g, m));
                let routable = if g.contains('*') {
                    open_ended
                } else {
                    !matcher::candidates(&configs, g).is_empty()
                };
                if !named && !routable {
                    diags.warn_at(
                        map.value(&gpath),
                        format!(
                            "caller `{}`: `{g}` matches no model any client serves",
                            c.name
                        ),
                    );
                }
            }
        }
        let caller = CallerConfig {
            name: c.name.clone(),
            token_sha256: digest.unwrap_or_default(),
            models: c.models.clone(),
            limits,
            max_tokens_default,
        };
        if caller.limits.budget_usd.is_some() && clients_complete {
            check_priced(
                &caller,
                &configs,
                prices,
                &known,
                &at("limits.budget_usd"),
                map,
                diags,
            );
        }
        out.push(caller);
    }
    for (i, t) in server.auth_tokens.iter().enumerate() {
        let d = secret::sha256(t.token.expose().as_bytes());
        if let Some(caller) = tokens.get(&d) {
            diags.error_at(
                map.value(&format!("server.auth_tokens[{i}]")),
                format!("this token is also the token of {caller}: list it in one place only"),
            );
            continue;
        }
        out.push(CallerConfig {
            name: t.name.clone(),
            token_sha256: d,
            models: None,
            limits: CallerLimits::default(),
            max_tokens_default: MAX_TOKENS_DEFAULT,
        });
    }
    warn_unpriced_clients(clients, prices, &out, map, diags);
    out
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn caller_limits(
    l: Option<&schema::LimitsSection>,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) -> CallerLimits {
    let Some(l) = l else {
        return CallerLimits::default();
    };
    let mut positive = |key: &str, v: Option<i64>, max: i64| -> Option<u64> {
        let v = v?;
        if v <= 0 || v > max {
            diags.error_at(
                map.value(&format!("{path}.{key}")),
                format!("{path}.{key} must be a whole number from 1 to {max}, got {v}"),
            );
            return None;
        }
        Some(v as u64)
    };
    let rpm = positive("rpm", l.rpm, i64::MAX);
    let tpm = positive("tpm", l.tpm, i64::MAX);
    let concurrency = positive("concurrency", l.concurrency, i64::from(u32::MAX)).map(|n| n as u32);
    let mut budget = |key: &str, b: &Option<schema::BudgetSection>, scale: f64, whole: bool| {
        let b = b.as_ref()?;
        let at = format!("{path}.{key}.amount");
        if b.amount <= 0.0 || !b.amount.is_finite() || (whole && b.amount.fract() != 0.0) {
            let what = if whole {
                "a whole number of tokens"
            } else {
                "an amount in USD"
            };
            diags.error_at(
                map.value(&at),
                format!("{at} must be more than 0 ({what}), got {}", b.amount),
            );
            return None;
        }
        let scaled = b.amount * scale;
        Some(Budget {
            amount: if scaled >= i64::MAX as f64 {
                i64::MAX
            } else {
                scaled.round() as i64
            },
            per: b.per,
        })
    };
    let budget_usd = budget("budget_usd", &l.budget_usd, NANOS_PER_USD, false);
    let budget_tokens = budget("budget_tokens", &l.budget_tokens, 1.0, true);
    CallerLimits {
        rpm,
        tpm,
        concurrency,
        budget_usd,
        budget_tokens,
    }
}

/// A caller with a USD budget may use only priced models: every model it
/// may ask for by name must have a price on every client that serves it.
fn check_priced(
    caller: &CallerConfig,
    clients: &[&ClientConfig],
    prices: &PriceTable,
    known: &[&str],
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) {
    let mut names: Vec<&str> = known.iter().copied().filter(|m| caller.allows(m)).collect();
    for g in caller.models.iter().flatten() {
        if !g.contains('*') {
            names.push(g);
        }
    }
    names.sort_unstable();
    names.dedup();
    for m in names {
        for ci in matcher::candidates(clients, m) {
            let c = clients[ci];
            if price_of(c, prices, m).is_none() {
                diags.error_at(
                    map.key(path),
                    format!(
                        "caller `{}` has budget_usd, but model `{m}` (client `{}`) has no price: add it to `prices`",
                        caller.name, c.name
                    ),
                );
            }
        }
    }
}

/// Where prices are in use, a client whose exact models have none is
/// worth a warning: its requests would cost nothing in the usage store.
fn warn_unpriced_clients(
    clients: &[(String, ClientConfig)],
    prices: &PriceTable,
    callers: &[CallerConfig],
    map: &SourceMap,
    diags: &mut Diags,
) {
    let in_use = !prices.is_empty()
        || clients.iter().any(|(_, c)| !c.prices.is_empty())
        || callers.iter().any(|c| c.limits.budget_usd.is_some());
    if !in_use {
        return;
    }
    for (path, c) in clients {
        if c.model_match.kind != MatchKind::Exact {
            continue;
        }
        let unpriced: Vec<&str> = c
            .model_match
            .values
            .iter()
            .map(String::as_str)
            .filter(|m| price_of(c, prices, m).is_none())
            .collect();
        if !unpriced.is_empty() {
            diags.warn_at(
                map.key(&format!("{path}.model_match")),
                format!(
                    "client `{}`: no price for {}: its requests get no cost_usd",
                    c.name,
                    unpriced
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

fn server(s: &schema::ServerSection, map: &SourceMap, diags: &mut Diags) -> ServerConfig {
    let listen_text = s.listen.as_deref().unwrap_or("127.0.0.1:8000");
    let listen = parse_listen(listen_text).unwrap_or_else(|| {
        diags.error_at(
            map.value("server.listen"),
            format!("server.listen: `{listen_text}` is not an address such as \"127.0.0.1:8000\" or \"[::]:8000\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 8000))
    });
    let mut auth_tokens = Vec::new();
    for (i, entry) in s.auth_tokens.iter().flatten().enumerate() {
        let path = format!("server.auth_tokens[{i}]");
        let (name, token) = match entry {
            AuthTokenEntry::Bare(token) => {
                (secret::token_name(&secret::sha256(token.as_bytes())), token)
            }
            AuthTokenEntry::Named { name, token } => (name.clone(), token),
        };
        if token.is_empty() {
            diags.error_at(map.value(&path), format!("{path}: the token is empty"));
            continue;
        }
        check_no_control_chars(token, &path, map, diags);
        auth_tokens.push(AuthToken {
            name,
            token: Secret::new(token.as_str()),
        });
    }
    let admin_token = match s.admin_token.as_deref() {
        Some("") => {
            diags.error_at(
                map.value("server.admin_token"),
                "server.admin_token is empty; remove it to disable /admin/*",
            );
            None
        }
        Some(t) => Some(Secret::new(t)),
        None => None,
    };
    let max_body_bytes = s.max_body_bytes.unwrap_or(32 * 1024 * 1024);
    if max_body_bytes == 0 {
        diags.error_at(
            map.value("server.max_body_bytes"),
            "server.max_body_bytes must be at least 1",
        );
    }
    let max_connections = s.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        diags.error_at(
            map.value("server.max_connections"),
            "server.max_connections must be at least 1",
        );
    }
    let header_read_timeout = s.header_read_timeout.unwrap_or(Duration::from_secs(30));
    if header_read_timeout.is_zero() {
        diags.error_at(
            map.value("server.header_read_timeout"),
            "server.header_read_timeout must be more than 0",
        );
    }
    let keepalive_timeout = s.keepalive_timeout.unwrap_or(Duration::from_secs(75));
    if keepalive_timeout.is_zero() {
        diags.error_at(
            map.value("server.keepalive_timeout"),
            "server.keepalive_timeout must be more than 0",
        );
    }
    ServerConfig {
        listen,
        auth_tokens,
        admin_token,
        max_body_bytes,
        shutdown_grace: s.shutdown_grace.unwrap_or(Duration::from_secs(30)),
        header_read_timeout,
        keepalive_timeout,
        max_connections,
    }
}

/// `host:port` with an IP address; `localhost` is taken as 127.0.0.1.
pub fn parse_listen(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    let port = text.strip_prefix("localhost:")?.parse().ok()?;
    Some(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port))
}

fn routing(
    r: &schema::RoutingSection,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) -> RoutingPolicy {
    let policy = RoutingPolicy::default().merged(r);
    check_policy(&policy, r, path, map, diags);
    policy
}

fn check_policy(
    policy: &RoutingPolicy,
    set: &schema::RoutingSection,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) {
    if set.max_attempts.is_some() && policy.max_attempts == 0 {
        diags.error_at(
            map.value(&format!("{path}.max_attempts")),
            "max_attempts must be at least 1",
        );
    }
    if set.max_failures.is_some() && policy.max_failures == 0 {
        diags.error_at(
            map.value(&format!("{path}.max_failures")),
            "max_failures must be at least 1",
        );
    }
    for (key, d) in [
        ("connect_timeout", set.connect_timeout),
        ("request_timeout", set.request_timeout),
        ("idle_timeout", set.idle_timeout),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            diags.error_at(
                map.value(&format!("{path}.{key}")),
                format!("{key} must be more than 0"),
            );
        }
    }
    if set.retry_on.is_some() {
        for (i, code) in policy.retry_on.iter().enumerate() {
            if !(100..=599).contains(code) {
                diags.error_at(
                    map.value(&format!("{path}.retry_on[{i}]")),
                    format!("retry_on: {code} is not an HTTP status code (100-599)"),
                );
            }
        }
    }
}

fn usage(u: &schema::UsageSection, base_dir: &Path) -> UsageConfig {
    UsageConfig {
        dir: resolve(base_dir, u.dir.as_deref().unwrap_or("./data")),
        enabled: u.enabled.unwrap_or(true),
    }
}

fn logging(
    l: &schema::LoggingSection,
    base_dir: &Path,
    map: &SourceMap,
    diags: &mut Diags,
) -> LoggingConfig {
    let level = l.level.clone().unwrap_or_else(|| "info".to_owned());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        diags.error_at(
            map.value("logging.level"),
            format!("logging.level: `{level}` is not a level (error, warn, info, debug, trace) or filter"),
        );
    }
    LoggingConfig {
        level,
        dir: l
            .dir
            .as_deref()
            .filter(|d| !d.is_empty())
            .map(|d| resolve(base_dir, d)),
        format: l.format.unwrap_or_default(),
    }
}

fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

fn check_no_control_chars(value: &str, path: &str, map: &SourceMap, diags: &mut Diags) -> bool {
    if value.chars().any(|c| c.is_control()) {
        diags.error_at(
            map.value(path),
            format!("{path}: contains a control character (CR, LF, ...), which cannot be sent in a header"),
        );
        return false;
    }
    true
}

fn client(
    c: &ClientSection,
    path: &str,
    global: &RoutingPolicy,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<ClientConfig> {
    let at = |key: &str| format!("{path}.{key}");
    if c.name.is_empty()
        || !c
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
    {
        diags.error_at(
            map.value(&at("name")),
            format!(
                "client name `{}` may use only letters, digits, `_`, `.` and `-`",
                c.name
            ),
        );
    }
    let base_url = c.base_url.trim_end_matches('/').to_owned();
    check_base_url(&base_url, &at("base_url"), map, diags);

    let mut keys: Vec<Secret> = Vec::new();
    let key_paths = c.api_key.iter().map(|k| (at("api_key"), k)).chain(
        c.api_keys
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, k)| (format!("{path}.api_keys[{i}]"), k)),
    );
    for (kpath, key) in key_paths {
        if key.is_empty() {
            diags.warn_at(map.value(&kpath), format!("{kpath}: empty key ignored"));
            continue;
        }
        if !check_no_control_chars(key, &kpath, map, diags) {
            continue;
        }
        let secret = Secret::new(key.as_str());
        if !keys.contains(&secret) {
            keys.push(secret);
        }
    }
    let api = c.api.unwrap_or_default();
    let auth = c.auth.unwrap_or(match api {
        Api::OpenAi => AuthStyle::Bearer,
        Api::Anthropic => AuthStyle::XApiKey,
    });
    let anthropic_version = c
        .anthropic_version
        .clone()
        .unwrap_or_else(|| DEFAULT_ANTHROPIC_VERSION.to_owned());
    if HeaderValue::from_str(&anthropic_version).is_err() || anthropic_version.is_empty() {
        diags.error_at(
            map.value(&at("anthropic_version")),
            "anthropic_version must be a non-empty header value such as \"2023-06-01\"",
        );
    }
    if auth == AuthStyle::None {
        if !keys.is_empty() {
            diags.warn_at(
                map.value(&at("auth")),
                format!(
                    "client `{}` has auth: none, so its keys are never sent",
                    c.name
                ),
            );
            keys.clear();
        }
        // One placeholder, never sent: key health then counts the client.
        keys.push(Secret::new(""));
    }
    if keys.is_empty() {
        diags.error_at(
            map.key(path),
            format!(
                "client `{}` has no keys: set api_key, api_keys, api_key_file or api_keys_file (or auth: none)",
                c.name
            ),
        );
    }

    let weight = c.weight.unwrap_or(1);
    if weight == 0 {
        diags.error_at(
            map.value(&at("weight")),
            "weight must be at least 1 (use priority to keep a client in reserve)",
        );
    }

    let mm = &c.model_match;
    if mm.value.is_empty() {
        diags.error_at(
            map.value(&at("model_match.value")),
            "model_match.value is empty: the client would match no model",
        );
    }
    let mut regexes = Vec::new();
    for (i, v) in mm.value.iter().enumerate() {
        let vpath = format!("{path}.model_match.value[{i}]");
        if v.is_empty() {
            diags.error_at(map.value(&vpath), "model_match value is empty");
        }
        if mm.kind == MatchKind::Regex {
            match Regex::new(&format!("^(?:{v})$")) {
                Ok(r) => regexes.push(r),
                Err(e) => diags.error_at(
                    map.value(&vpath),
                    format!("invalid regex `{v}`: {}", first_line_of_regex_error(&e)),
                ),
            }
        }
    }

    let mut headers = Vec::new();
    for (name, value) in c.headers.iter().flatten() {
        let hpath = format!("{path}.headers.{name}");
        let parsed_name = HeaderName::from_bytes(name.as_bytes());
        let parsed_value = HeaderValue::from_str(value);
        match (parsed_name, parsed_value) {
            (Ok(n), Ok(mut v)) => {
                if HEADERS_NOT_SETTABLE.contains(&n.as_str()) {
                    diags.error_at(map.key(&hpath), format!("header `{name}` is managed by gptbalance and cannot be set"));
                } else if headers.iter().any(|(seen, _)| *seen == n) {
                    // Names are case-insensitive: `X-Key` and `x-key` would
                    // both be sent.
                    diags.error_at(
                        map.key(&hpath),
                        format!("header `{name}` is set twice (header names ignore case)"),
                    );
                } else {
                    v.set_sensitive(true);
                    headers.push((n, v));
                }
            }
            (Err(_), _) => diags.error_at(map.key(&hpath), format!("`{name}` is not a valid header name")),
            (_, Err(_)) => diags.error_at(
                map.value(&hpath),
                format!("the value of header `{name}` is not valid (control characters such as CR or LF are not allowed)"),
            ),
        }
    }

    let overrides = c.routing_overrides();
    let policy = global.merged(&overrides);
    check_policy(&policy, &overrides, path, map, diags);

    // Other problems are reported but still leave a client whose matching
    // can be checked (fallback targets, cycles); the config is rejected anyway.
    if regexes.len() != mm.value.len() && mm.kind == MatchKind::Regex {
        return None;
    }
    Some(ClientConfig {
        name: c.name.clone(),
        base_url,
        api,
        auth,
        anthropic_version,
        keys,
        priority: c.priority.unwrap_or(100),
        weight,
        model_match: MatchRule {
            kind: mm.kind,
            values: mm.value.clone(),
            regexes,
        },
        fallback: c.fallback.clone().unwrap_or_default(),
        upstream_model: c.upstream_model.clone().filter(|m| !m.is_empty()),
        special_prefix: c.special_prefix.clone().filter(|p| !p.is_empty()),
        stop: c.stop.clone(),
        max_tokens: c.max_tokens,
        extra_body: c.extra_body.clone().unwrap_or_default(),
        headers,
        prices: price_table(
            c.prices.as_ref().unwrap_or(&BTreeMap::new()),
            &at("prices"),
            map,
            diags,
        ),
        policy,
    })
}

fn first_line_of_regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_owned())
        .unwrap_or(text)
}

fn check_base_url(url: &str, path: &str, map: &SourceMap, diags: &mut Diags) {
    let problem = match url.parse::<http::Uri>() {
        Err(_) => Some("is not a URL".to_owned()),
        Ok(uri) => match (uri.scheme_str(), uri.host()) {
            (Some("http") | Some("https"), Some(h)) if !h.is_empty() => {
                if uri.query().is_some() {
                    Some("must not have a query string".to_owned())
                } else if url.contains('#') {
                    Some("must not have a fragment".to_owned())
                } else {
                    None
                }
            }
            (Some("http") | Some("https"), _) => Some("has no host".to_owned()),
            _ => Some("must start with http:// or https://".to_owned()),
        },
    };
    if let Some(problem) = problem {
        diags.error_at(map.value(path), format!("base_url `{url}` {problem}"));
    }
}

/// Fallback targets must route somewhere, and fallback chains must not loop.
fn check_fallbacks(
    clients: &[(String, ClientConfig)],
    complete: bool,
    map: &SourceMap,
    diags: &mut Diags,
) {
    let configs: Vec<&ClientConfig> = clients.iter().map(|(_, c)| c).collect();
    let mut missing = HashSet::new();
    for (path, c) in clients {
        for (i, target) in c.fallback.iter().enumerate() {
            // A fallback is routed among the clients of the same API.
            if matcher::candidates_of(&configs, c.api, target).is_empty() {
                missing.insert(target.clone());
                if !complete {
                    continue;
                }
                let fpath = if c.fallback.len() == 1
                    && map.value(&format!("{path}.fallback[0]")) == map.value(path)
                {
                    format!("{path}.fallback")
                } else {
                    format!("{path}.fallback[{i}]")
                };
                diags.error_at(
                    map.value(&fpath),
                    format!(
                        "fallback target `{target}` of client `{}` is matched by no {}client",
                        c.name,
                        match c.api {
                            Api::OpenAi => "",
                            Api::Anthropic => "`anthropic` ",
                        }
                    ),
                );
            }
        }
    }
    // Edges between fallback targets: a cycle must run through them only.
    let next = |model: &str| -> Option<&Vec<String>> {
        matcher::candidates(&configs, model)
            .into_iter()
            .find(|&i| !configs[i].fallback.is_empty())
            .map(|i| &configs[i].fallback)
    };
    let mut reported = HashSet::new();
    for (path, c) in clients {
        for start in &c.fallback {
            if missing.contains(start) {
                continue;
            }
            let mut chain = vec![start.clone()];
            if let Some(cycle) = find_cycle(&next, &mut chain) {
                let mut key: Vec<String> = cycle.clone();
                key.sort();
                key.dedup();
                if reported.insert(key) {
                    diags.error_at(
                        map.value(&format!("{path}.fallback")),
                        format!("fallback cycle: {}", cycle.join(" -> ")),
                    );
                }
            }
        }
    }
}

/// Depth-first walk of fallback edges from the end of `chain`.
fn find_cycle<'a>(
    next: &dyn Fn(&str) -> Option<&'a Vec<String>>,
    chain: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = chain.last()?.clone();
    let targets = next(&last)?;
    for t in targets {
        if let Some(pos) = chain.iter().position(|m| m == t) {
            let mut cycle = chain[pos..].to_vec();
            cycle.push(t.clone());
            return Some(cycle);
        }
        chain.push(t.clone());
        if let Some(c) = find_cycle(next, chain) {
            return Some(c);
        }
        chain.pop();
    }
    None
}

/// Warns about clients no model name can reach: a regex or keyword client
/// whose every value is a plain name that some exact client owns (exact
/// matches shadow the others).
fn warn_unreachable_clients(
    clients: &[(String, ClientConfig)],
    map: &SourceMap,
    diags: &mut Diags,
) {
    let exact: HashSet<&str> = clients
        .iter()
        .filter(|(_, c)| c.model_match.kind == MatchKind::Exact)
        .flat_map(|(_, c)| c.model_match.values.iter().map(String::as_str))
        .collect();
    for (path, c) in clients {
        if c.model_match.kind != MatchKind::Regex {
            continue;
        }
        let literal = |v: &str| {
            v.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | ':' | '/'))
        };
        if c.model_match
            .values
            .iter()
            .all(|v| literal(v) && exact.contains(v.as_str()))
        {
            diags.warn_at(
                map.key(&format!("{path}.model_match")),
                format!(
                    "client `{}` can never be chosen: every model it matches is matched exactly by another client",
                    c.name
                ),
            );
        }
    }
}
