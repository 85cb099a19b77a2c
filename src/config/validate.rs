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

use super::diags::Diags;
use super::matcher;
use super::prices::{glob_match, Price, PriceTable, NANOS_PER_USD};
use super::schema::{self, Api, AuthStyle, AuthTokenEntry, ClientSection, MatchKind};
use super::source_map::SourceMap;
use super::{
    AuthToken, Budget, CallerConfig, CallerLimits, ClientConfig, Config, IpNet, LoggingConfig,
    MatchRule, RoutingPolicy, ServerConfig, SharedStateConfig, UsageConfig,
};
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
    /// `Some(None)`: no `shared_state`.
    pub shared_state: Option<Option<schema::SharedStateSection>>,
    /// `(path, caller)` per list item.
    pub callers: Vec<(String, Option<schema::CallerSection>)>,
    /// `(path, entry)` per `shadow` item.
    pub shadow: Vec<(String, Option<schema::ShadowSection>)>,
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
            shared_state: Some(None),
            callers: Vec::new(),
            shadow: Vec::new(),
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
        || s.shared_state.is_none()
        || s.callers.iter().any(|(_, c)| c.is_none())
        || s.shadow.iter().any(|(_, c)| c.is_none());
    let prices = price_table(
        s.prices.as_ref().unwrap_or(&Default::default()),
        "prices",
        map,
        diags,
    );
    let server = server(
        s.server.as_ref().unwrap_or(&Default::default()),
        base_dir,
        map,
        diags,
    );
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

    let shared_state = s
        .shared_state
        .as_ref()
        .and_then(|o| o.as_ref())
        .and_then(|sec| shared_state(sec, map, diags));

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
    // With a client missing, a target might have been matched by it and a
    // chain might have gone through it: fallbacks are checked once every
    // client parses, so no error is a knock-on of another.
    if all_valid {
        check_fallbacks(&clients, map, diags);
    }
    if all_valid {
        warn_unreachable_clients(&clients, map, diags);
    }
    let callers = callers(
        &s.callers, &server, &clients, &prices, all_valid, map, diags,
    );
    let shadow = shadow(&s.shadow, &clients, map, diags);
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
        shadow,
        clients: clients.into_iter().map(|(_, c)| c).collect(),
        shared_state,
        read_files: Vec::new(),
    })
}

/// `shared_state`: a `redis://` or `rediss://` URL with a host and port, a timeout above
/// zero, at least one replica.
fn shared_state(
    s: &schema::SharedStateSection,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<SharedStateConfig> {
    let Some(url) = s.url.as_deref() else {
        diags.error_at(
            map.value("shared_state"),
            "shared_state.url is required, e.g. \"redis://127.0.0.1:6379/0\"",
        );
        return None;
    };
    let address = match parse_redis_url(url) {
        Ok(a) => a,
        Err(problem) => {
            // The URL may hold a password: the message shows its form only.
            diags.error_at(
                map.value("shared_state.url"),
                format!("shared_state.url {problem}"),
            );
            return None;
        }
    };
    let timeout = s.timeout.unwrap_or(Duration::from_millis(50));
    if timeout.is_zero() {
        diags.error_at(
            map.value("shared_state.timeout"),
            "shared_state.timeout must be more than 0",
        );
    }
    let replicas = s.replicas.unwrap_or(1);
    if !(1..=u32::MAX as i64).contains(&replicas) {
        diags.error_at(
            map.value("shared_state.replicas"),
            format!("shared_state.replicas must be at least 1, not {replicas}"),
        );
    }
    let on_outage = s.on_outage.unwrap_or_default();
    if on_outage == schema::OnOutage::LocalShare && s.replicas.is_none() {
        diags.warn_at(
            map.value("shared_state"),
            "shared_state.on_outage is local_share but shared_state.replicas is not set: during an outage each instance enforces the whole limit",
        );
    }
    if s.instance.is_none() {
        diags.warn_at(
            map.value("shared_state"),
            "shared_state.instance is not set: each start publishes its budget spend under a new id (host name and pid), and the previous id's entry keeps counting until the period ends; set a stable id such as \"${HOSTNAME}\"",
        );
    }
    let instance = match s.instance.as_deref() {
        Some(i) if i.is_empty() || i.chars().any(|c| c.is_control() || c.is_whitespace()) => {
            diags.error_at(
                map.value("shared_state.instance"),
                "shared_state.instance must be a non-empty name without spaces",
            );
            None
        }
        other => other.map(str::to_owned),
    };
    Some(SharedStateConfig {
        url: Secret::new(url),
        address,
        timeout,
        on_outage,
        replicas: replicas.clamp(1, u32::MAX as i64) as u32,
        instance,
    })
}

/// The `host:port` of a `redis[s]://[user:password@]host[:port][/db]` URL, or
/// what is wrong with it (never quoting it: it may hold a password).
pub fn parse_redis_url(url: &str) -> Result<String, String> {
    let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    else {
        return Err("must start with redis:// or rediss:// (TLS)".to_owned());
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err("has an unclosed [ in its host".to_owned()),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    let port: u16 = match port {
        None => 6379,
        Some(p) => match p.parse() {
            Ok(n) if n > 0 => n,
            _ => return Err("has a port that is not a number from 1 to 65535".to_owned()),
        },
    };
    let db = path.split('?').next().unwrap_or("");
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err("has a database that is not a number (redis://host:port/0)".to_owned());
    }
    if path.contains('?') {
        return Err("must not have a query string".to_owned());
    }
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// `shadow`: each names a client of the config, a share from 0 to 100
/// and a daily cap of at least 0.
fn shadow(
    entries: &[(String, Option<schema::ShadowSection>)],
    clients: &[(String, ClientConfig)],
    map: &SourceMap,
    diags: &mut Diags,
) -> Vec<super::ShadowConfig> {
    let mut out = Vec::new();
    for (path, e) in entries {
        let Some(e) = e else { continue };
        let mut ok = true;
        if !clients.iter().any(|(_, c)| c.name == e.client) {
            diags.error_at(
                map.value(&format!("{path}.client")),
                format!("{path}.client: no client named `{}`", e.client),
            );
            ok = false;
        }
        if !(e.percent > 0.0 && e.percent <= 100.0) {
            diags.error_at(
                map.value(&format!("{path}.percent")),
                format!(
                    "{path}.percent must be more than 0 and at most 100, got {}",
                    e.percent
                ),
            );
            ok = false;
        }
        if e.max_usd_per_day.is_some_and(|m| m < 0.0) {
            diags.error_at(
                map.value(&format!("{path}.max_usd_per_day")),
                format!("{path}.max_usd_per_day cannot be negative"),
            );
            ok = false;
        }
        if ok {
            out.push(super::ShadowConfig {
                client: e.client.clone(),
                percent: e.percent,
                models: e.models.clone(),
                max_nanos_per_day: e
                    .max_usd_per_day
                    .map(|m| (m * NANOS_PER_USD).min(i64::MAX as f64) as i64),
            });
        }
    }
    out
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
        check_name("caller", &c.name, &at("name"), map, diags);
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
            (Some(t), None) => {
                warn_weak_token(t, &at("token"), map, diags);
                check_no_control_chars(t, &at("token"), map, diags)
                    .then(|| secret::sha256(t.as_bytes()))
            }
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

/// Client and caller names appear in paths, metric labels and usage rows:
/// `[A-Za-z0-9_.-]+`.
fn check_name(kind: &str, name: &str, path: &str, map: &SourceMap, diags: &mut Diags) {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'));
    if !valid {
        diags.error_at(
            map.value(path),
            format!("{kind} name `{name}` may use only letters, digits, `_`, `.` and `-`"),
        );
    }
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

fn server(
    s: &schema::ServerSection,
    base_dir: &Path,
    map: &SourceMap,
    diags: &mut Diags,
) -> ServerConfig {
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
        let (name, token, at) = match entry {
            AuthTokenEntry::Bare(token) => (
                secret::token_name(&secret::sha256(token.as_bytes())),
                token,
                path.clone(),
            ),
            AuthTokenEntry::Named { name, token } => (name.clone(), token, format!("{path}.token")),
        };
        if token.is_empty() {
            diags.error_at(map.value(&path), format!("{path}: the token is empty"));
            continue;
        }
        check_no_control_chars(token, &path, map, diags);
        warn_weak_token(token, &at, map, diags);
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
        Some(t) => {
            warn_weak_token(t, "server.admin_token", map, diags);
            Some(Secret::new(t))
        }
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
        cors: s.cors.as_ref().map(|c| cors(c, map, diags)),
        trusted_proxies: trusted_proxies(
            s.trusted_proxies.as_deref().unwrap_or_default(),
            map,
            diags,
        ),
        tls: s.tls.as_ref().and_then(|t| tls(t, base_dir, map, diags)),
    }
}

/// `server.tls`: both files named, read now (paths against the config
/// file's directory), the key matching the certificate.
fn tls(
    t: &schema::TlsSection,
    base_dir: &Path,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<crate::config::ListenerTls> {
    let (Some(cert), Some(key)) = (t.cert.as_deref(), t.key.as_deref()) else {
        diags.error_at(
            map.value("server.tls"),
            "server.tls needs both `cert` (PEM certificate chain) and `key` (PEM private key)",
        );
        return None;
    };
    let (cert, key) = (resolve(base_dir, cert), resolve(base_dir, key));
    match super::tls::read(&cert, &key) {
        Ok(identity) => Some(crate::config::ListenerTls {
            cert,
            key,
            identity,
        }),
        Err(e) => {
            let at = match e {
                super::tls::TlsFileError::CertUnreadable { .. }
                | super::tls::TlsFileError::CertNotPem { .. }
                | super::tls::TlsFileError::CertInvalid { .. } => "server.tls.cert",
                _ => "server.tls.key",
            };
            diags.error_at(map.value(at), e.to_string());
            None
        }
    }
}

fn trusted_proxies(list: &[String], map: &SourceMap, diags: &mut Diags) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        match IpNet::parse(text.trim()) {
            Some(net) => out.push(net),
            None => {
                let path = format!("server.trusted_proxies[{i}]");
                diags.error_at(
                    map.value(&path),
                    format!("{path}: `{text}` is not an address or block such as \"10.0.0.0/8\" or \"::1\""),
                );
            }
        }
    }
    out
}

/// `server.cors`: each origin `scheme://host[:port]` with no path (what a
/// browser sends in `Origin`) or `*`; header names as HTTP allows them.
fn cors(c: &schema::CorsSection, map: &SourceMap, diags: &mut Diags) -> crate::config::Cors {
    let mut allow_origins = Vec::new();
    for (i, origin) in c.allow_origins.iter().flatten().enumerate() {
        let path = format!("server.cors.allow_origins[{i}]");
        let shape_ok = origin == "*"
            || origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https")
                    && !rest.is_empty()
                    && !rest.contains(['/', '?', '#', ' '])
            });
        if shape_ok {
            allow_origins.push(origin.to_ascii_lowercase());
        } else {
            diags.error_at(
                map.value(&path),
                format!("{path}: `{origin}` is not an origin such as \"https://app.example.com\" (scheme, host and port, no path) or \"*\""),
            );
        }
    }
    if c.allow_origins.as_ref().is_none_or(Vec::is_empty) {
        diags.error_at(
            map.value("server.cors"),
            "server.cors.allow_origins is empty: list the origins browsers may call from, or remove server.cors",
        );
    }
    let allow_headers = c.allow_headers.as_ref().map(|names| {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_ok() {
                out.push(name.to_ascii_lowercase());
            } else {
                let path = format!("server.cors.allow_headers[{i}]");
                diags.error_at(
                    map.value(&path),
                    format!("{path}: `{name}` is not a header name"),
                );
            }
        }
        out
    });
    crate::config::Cors {
        allow_origins,
        allow_headers,
    }
}

/// Tokens shorter than this are warned about: a guessable token on a
/// reachable address spends the operator's keys.
const MIN_TOKEN_CHARS: usize = 16;

/// Placeholder values as shipped in examples and tutorials, compared with
/// the token lowercased and stripped to its letters and digits.
const PLACEHOLDERS: &[&str] = &[
    "admin", "apikey", "changeit", "default", "dummy", "example", "insecure", "letmein",
    "password", "passw0rd", "secret", "skxxx", "test", "todo", "token", "yourkey",
];
/// Words that make any token containing them a placeholder.
const PLACEHOLDER_WORDS: &[&str] = &[
    "changeme",
    "replaceme",
    "yourapikey",
    "yourtoken",
    "yoursecret",
    "placeholder",
    "fixme",
];

/// Warns (an error under `--strict`) about an auth or admin token that
/// is a well-known placeholder or shorter than [`MIN_TOKEN_CHARS`]. The
/// message never repeats the token.
fn warn_weak_token(token: &str, path: &str, map: &SourceMap, diags: &mut Diags) {
    let plain: String = token
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let first = plain.chars().next();
    let placeholder = PLACEHOLDERS.contains(&plain.as_str())
        || PLACEHOLDER_WORDS.iter().any(|w| plain.contains(w))
        || first.is_some_and(|f| plain.len() >= 3 && plain.chars().all(|c| c == f));
    let chars = token.chars().count();
    if placeholder {
        diags.warn_at(
            map.value(path),
            format!("{path}: a well-known placeholder value; set a random token of at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)"),
        );
    } else if chars < MIN_TOKEN_CHARS {
        diags.warn_at(
            map.value(path),
            format!("{path}: only {chars} characters; use a random token of at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 24`)"),
        );
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
    check_selection(r, path, map, diags);
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

/// The selection keys (SPEC §11): durations above 0, an `affinity.from`
/// of a known form.
fn check_selection(set: &schema::RoutingSection, path: &str, map: &SourceMap, diags: &mut Diags) {
    for (key, d) in [
        ("deadline", set.deadline),
        ("first_token_timeout", set.first_token_timeout),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            diags.error_at(
                map.value(&format!("{path}.{key}")),
                format!("{key} must be more than 0"),
            );
        }
    }
    if let Some(a) = &set.affinity {
        if let Err(e) = super::Affinity::parse(&a.from) {
            diags.error_at(map.value(&format!("{path}.affinity.from")), e);
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
        access: l.access.unwrap_or(true),
    }
}

/// `p` against the config file's directory, without `.` components, so
/// that messages name `/etc/gptbalance/data`, not `/etc/gptbalance/./data`.
fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    let clean: PathBuf = joined
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect();
    if clean.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        clean
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
    check_name("client", &c.name, &at("name"), map, diags);
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
    check_selection(&overrides, path, map, diags);

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
        discover_models: c.discover_models.unwrap_or(false),
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
fn check_fallbacks(clients: &[(String, ClientConfig)], map: &SourceMap, diags: &mut Diags) {
    let configs: Vec<&ClientConfig> = clients.iter().map(|(_, c)| c).collect();
    let mut missing = HashSet::new();
    for (path, c) in clients {
        for (i, target) in c.fallback.iter().enumerate() {
            // A fallback is routed among the clients of the same API.
            if matcher::candidates_of(&configs, c.api, target).is_empty() {
                missing.insert(target.clone());
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

#[cfg(test)]
mod tests {
    use super::parse_redis_url;

    #[test]
    fn redis_urls_give_host_and_port_and_never_echo_the_password() {
        let ok = |u: &str| parse_redis_url(u).unwrap();
        assert_eq!(ok("redis://127.0.0.1:6379/0"), "127.0.0.1:6379");
        assert_eq!(ok("redis://cache"), "cache:6379");
        assert_eq!(ok("redis://:pw@cache:7000/3"), "cache:7000");
        assert_eq!(ok("redis://user:p@ss@cache:7000"), "cache:7000");
        assert_eq!(ok("redis://[::1]:6380/1"), "[::1]:6380");
        assert_eq!(
            ok("rediss://:pw@cache.example:6380/0"),
            "cache.example:6380"
        );
        for (bad, says) in [
            ("http://h:1", "must start with redis://"),
            ("rediss://:secret@:1", "no host"),
            ("redis://:6379", "no host"),
            ("redis://h:0", "port"),
            ("redis://h:x", "port"),
            ("redis://h:6379/db", "database"),
            ("redis://h:6379/0?x=1", "query"),
        ] {
            let e = parse_redis_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
