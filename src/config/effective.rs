//! The effective config as JSON, with every secret redacted: what
//! `GET /admin/config` answers and what `gptbalance diff` compares.
//!
//! Defaults are applied and paths resolved, so two files that mean the same
//! give the same JSON. A secret never appears: keys show as their id
//! (`key-1a2b3c4d`), tokens as their name's id (`token-1a2b3c4d`), header
//! values and the admin token as `redacted:` and 8 hex digits of their
//! SHA-256 (enough to see that one changed, nothing to recover it).

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    Budget, CallerConfig, ClientConfig, Config, MatchKind, MatchRule, PriceTable, RoutingPolicy,
};
use crate::secret;

/// The redacted form of a secret value.
fn redacted(value: &str) -> String {
    let id = secret::token_name(&secret::sha256(value.as_bytes()));
    format!("redacted:{}", id.trim_start_matches("token-"))
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn budget(b: Option<Budget>, scale: f64) -> Value {
    b.map_or(
        Value::Null,
        |b| json!({ "amount": b.amount as f64 / scale, "per": b.per.as_str() }),
    )
}

fn prices(t: &PriceTable) -> Value {
    let mut m = Map::new();
    for (pattern, p) in t.entries() {
        m.insert(
            pattern.to_owned(),
            json!({ "input": p.input, "cached_input": p.cached_input, "output": p.output }),
        );
    }
    Value::Object(m)
}

pub fn policy(p: &RoutingPolicy) -> Value {
    json!({
        "connect_timeout": duration(p.connect_timeout),
        "request_timeout": duration(p.request_timeout),
        "idle_timeout": duration(p.idle_timeout),
        "max_attempts": p.max_attempts,
        "max_fallback_depth": p.max_fallback_depth,
        "retry_on": p.retry_on,
        "max_failures": p.max_failures,
        "cooldown": duration(p.cooldown),
        "key_strategy": p.key_strategy.as_str(),
        "probe_keys": p.probe_keys,
        "deadline": p.deadline.map(duration),
        "first_token_timeout": p.first_token_timeout.map(duration),
        "affinity": p.affinity.as_ref().map(|a| a.describe()),
        "balance": p.balance.as_str(),
    })
}

fn caller(c: &CallerConfig) -> Value {
    let l = &c.limits;
    json!({
        "name": c.name,
        "token": secret::token_name(&c.token_sha256),
        "models": c.models,
        "limits": {
            "rpm": l.rpm,
            "tpm": l.tpm,
            "concurrency": l.concurrency,
            "budget_usd": budget(l.budget_usd, super::prices::NANOS_PER_USD),
            "budget_tokens": budget(l.budget_tokens, 1.0),
        },
        "max_tokens_default": c.max_tokens_default,
    })
}

fn client(c: &ClientConfig) -> Value {
    let headers: Map<String, Value> = c
        .headers
        .iter()
        .map(|(n, v)| {
            let v = String::from_utf8_lossy(v.as_bytes());
            (n.as_str().to_owned(), Value::String(redacted(&v)))
        })
        .collect();
    json!({
        "name": c.name,
        "base_url": c.base_url,
        "api": c.api.as_str(),
        "auth": c.auth.as_str(),
        "anthropic_version": (c.api == super::Api::Anthropic).then_some(&c.anthropic_version),
        // `auth: none` holds one placeholder key, never sent: none to show.
        "keys": c.keys.iter().filter(|_| c.auth != super::AuthStyle::None).map(|k| k.key_id().to_string()).collect::<Vec<_>>(),
        "priority": c.priority,
        "weight": c.weight,
        "model_match": { "type": c.model_match.kind.to_string(), "value": c.model_match.values },
        "fallback": c.fallback,
        "upstream_model": c.upstream_model,
        "special_prefix": c.special_prefix,
        "stop": c.stop,
        "max_tokens": c.max_tokens,
        "discover_models": c.discover_models,
        "extra_body": c.extra_body,
        "headers": headers,
        "prices": prices(&c.prices),
        "routing": policy(&c.policy),
    })
}

/// The whole config, redacted.
pub fn to_json(cfg: &Config) -> Value {
    let s = &cfg.server;
    json!({
        "server": {
            "listen": s.listen.to_string(),
            "admin_token": s.admin_token.as_ref().map(|t| redacted(t.expose())),
            "max_body_bytes": s.max_body_bytes,
            "shutdown_grace": duration(s.shutdown_grace),
            "header_read_timeout": duration(s.header_read_timeout),
            "keepalive_timeout": duration(s.keepalive_timeout),
            "cors": s.cors.as_ref().map(|c| json!({
                "allow_origins": c.allow_origins,
                "allow_headers": c.allow_headers,
            })),
            "trusted_proxies": s
                .trusted_proxies
                .iter()
                .map(|n| format!("{}/{}", n.addr, n.prefix))
                .collect::<Vec<_>>(),
            "max_connections": s.max_connections,
            // The files' paths; what they hold is never shown.
            "tls": s.tls.as_ref().map(|t| json!({
                "cert": t.cert.display().to_string(),
                "key": t.key.display().to_string(),
            })),
        },
        "routing": policy(&cfg.routing),
        "usage": { "dir": cfg.usage.dir.display().to_string(), "enabled": cfg.usage.enabled },
        "logging": {
            "level": cfg.logging.level,
            "dir": cfg.logging.dir.as_ref().map(|d| d.display().to_string()),
            "format": format!("{:?}", cfg.logging.format).to_lowercase(),
            "access": cfg.logging.access,
        },
        "shared_state": cfg.shared_state.as_ref().map(|sh| json!({
            "address": sh.address,
            "url": redacted(sh.url.expose()),
            "timeout": duration(sh.timeout),
            "on_outage": sh.on_outage.as_str(),
            "replicas": sh.replicas,
            "instance": sh.instance,
        })),
        "shadow": cfg.shadow.iter().map(|sh| json!({
            "client": sh.client,
            "percent": sh.percent,
            "models": sh.models,
            "max_usd_per_day": sh.max_nanos_per_day.map(|n| n as f64 / super::prices::NANOS_PER_USD),
        })).collect::<Vec<_>>(),
        "prices": prices(&cfg.prices),
        "callers": cfg.callers.iter().map(caller).collect::<Vec<_>>(),
        "clients": cfg.clients.iter().map(client).collect::<Vec<_>>(),
    })
}

/// The clients of an effective config, with what routing needs (name,
/// priority, weight, matching, fallback) and nothing else: enough to
/// compute any model's candidates as the daemon that sent it would.
pub fn routing_clients(effective: &Value) -> Vec<ClientConfig> {
    let list = effective["clients"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|c| {
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let kind = match c["model_match"]["type"].as_str() {
                Some("keyword") => MatchKind::Keyword,
                Some("regex") => MatchKind::Regex,
                _ => MatchKind::Exact,
            };
            let values = strings(&c["model_match"]["value"]);
            let regexes = if kind == MatchKind::Regex {
                values
                    .iter()
                    .filter_map(|v| regex::Regex::new(&format!("^(?:{v})$")).ok())
                    .collect()
            } else {
                Vec::new()
            };
            ClientConfig {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                priority: c["priority"].as_i64().unwrap_or(100),
                weight: c["weight"].as_u64().unwrap_or(1) as u32,
                model_match: MatchRule {
                    kind,
                    values,
                    regexes,
                },
                fallback: strings(&c["fallback"]),
                ..ClientConfig::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn no_secret_is_shown_and_routing_survives_the_round_trip() {
        let yaml = r#"
server:
  admin_token: admin-secret-value
  auth_tokens: [bare-secret-token]
callers:
  - { name: app, token: caller-secret-token, limits: { budget_usd: { amount: 2.5, per: day } } }
prices:
  "*": { input: 1, output: 2 }
openai_clients:
  - name: a
    base_url: "http://h"
    api_keys: [sk-secret-1, sk-secret-2]
    headers: { api-key: header-secret }
    priority: 2
    weight: 3
    model_match: { type: regex, value: ["m.*"] }
    fallback: [x]
  - { name: b, base_url: "http://h", api_key: sk-secret-3, model_match: { type: exact, value: [x] } }
"#;
        let cfg = crate::config::load_str(yaml, Path::new("t.yaml"), &|_| None)
            .unwrap()
            .config;
        let v = to_json(&cfg);
        let text = v.to_string();
        for secret in [
            "admin-secret-value",
            "bare-secret-token",
            "caller-secret-token",
            "sk-secret-1",
            "sk-secret-2",
            "sk-secret-3",
            "header-secret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(v["callers"][0]["limits"]["budget_usd"]["amount"], 2.5);
        assert_eq!(v["clients"][0]["keys"].as_array().unwrap().len(), 2);
        let stubs = routing_clients(&v);
        assert_eq!(crate::config::matcher::candidates(&stubs, "m-1"), [0]);
        assert_eq!(crate::config::matcher::candidates(&stubs, "x"), [1]);
        assert_eq!(stubs[0].fallback, ["x"]);
        assert_eq!((stubs[0].priority, stubs[0].weight), (2, 3));
    }

    /// Every key the README's config reference documents shows in the
    /// effective config (under its own name, or the one it is another form
    /// of), so `diff` and `GET /admin/config` see a change of any of them.
    #[test]
    fn every_documented_key_is_in_the_effective_config() {
        let yaml = r#"
shared_state: { url: "redis://127.0.0.1:6379" }
callers:
  - { name: app, token: caller-secret-token-1, limits: { rpm: 1 } }
shadow:
  - { client: a, percent: 1 }
openai_clients:
  - { name: a, base_url: "http://h", api_key: k, model_match: { type: exact, value: [m] } }
"#;
        let cfg = crate::config::load_str(yaml, Path::new("t.yaml"), &|_| None)
            .unwrap()
            .config;
        let v = to_json(&cfg);
        let readme = include_str!("../../README.md");
        let sections = [
            ("server", "/server"),
            ("routing", "/routing"),
            ("usage", "/usage"),
            ("logging", "/logging"),
            ("callers", "/callers/0"),
            ("shadow", "/shadow/0"),
            ("shared_state", "/shared_state"),
            ("openai_clients", "/clients/0"),
        ];
        let mut checked = 0;
        for (section, at) in sections {
            let heading = format!("### `{section}`");
            let start = readme
                .find(&heading)
                .unwrap_or_else(|| panic!("README has no {heading}"));
            let body = &readme[start + heading.len()..];
            let body = &body[..body.find("\n### ").unwrap_or(body.len())];
            for line in body.lines() {
                let Some(key) = line
                    .strip_prefix("| `")
                    .and_then(|l| l.split_once("` |"))
                    .map(|(k, _)| k)
                else {
                    continue;
                };
                let shown = match (section, key) {
                    // Listed as callers without limits.
                    ("server", "auth_tokens") => continue,
                    (_, "admin_token_file") => "admin_token",
                    (_, "token_file" | "token_sha256") => "token",
                    (_, "api_key" | "api_key_file" | "api_keys" | "api_keys_file") => "keys",
                    ("callers", "rpm" | "tpm" | "concurrency" | "budget_usd" | "budget_tokens") => {
                        &format!("limits/{key}")
                    }
                    _ => key,
                };
                let path = format!("{at}/{shown}");
                assert!(
                    v.pointer(&path).is_some(),
                    "README documents `{section}.{key}` but the effective config has no {path}"
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} keys found in the README");
    }
}
