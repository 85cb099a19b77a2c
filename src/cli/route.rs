//! `gptbalance route MODEL`: how a request for MODEL would be routed.

use std::process::ExitCode;

use super::ConfigArg;
use crate::config::load::did_you_mean;
use crate::config::{Api, MatchKind, MatchRule};
use crate::routing::RoutingTable;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The model name a caller would send
    pub model: String,
}

pub fn run(args: Args) -> ExitCode {
    let loaded = match super::load_or_exit(&args.config.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let table = RoutingTable::build(loaded.config, None);
    match explain(&table, &args.model) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(text) => {
            print!("{text}");
            ExitCode::from(1)
        }
    }
}

/// The explanation; `Err` when no client serves `model`. OpenAI clients
/// (the usual endpoints) first, then Anthropic clients (`/v1/messages`)
/// when some serve it.
pub fn explain(table: &RoutingTable, model: &str) -> Result<String, String> {
    let openai = table.candidates(model);
    let anthropic = table.candidates_of(Api::Anthropic, model);
    if openai.is_empty() && anthropic.is_empty() {
        let mut out = format!(
            "no client serves model `{model}`: a request for it gets 404 model_not_found\n"
        );
        let names = known_names(table);
        let mut near: Vec<(usize, &str)> = names
            .iter()
            .map(|n| (crate::config::load::edit_distance(model, n), n.as_str()))
            .collect();
        near.sort();
        let close: Vec<&str> = near
            .iter()
            .take(3)
            .filter(|(d, _)| *d <= model.len().max(3))
            .map(|(_, n)| *n)
            .collect();
        if let Some(best) = did_you_mean(model, names.iter().map(String::as_str)) {
            out.push_str(&format!("did you mean `{best}`?\n"));
        } else if !close.is_empty() {
            out.push_str(&format!("nearest model names: {}\n", close.join(", ")));
        }
        return Err(out);
    }
    let mut out = String::new();
    if !openai.is_empty() {
        out.push_str(&format!("model `{model}`\n"));
        explain_api(table, Api::OpenAi, model, &openai, &mut out);
    }
    if !anthropic.is_empty() {
        out.push_str(&format!(
            "model `{model}` on /v1/messages (Anthropic clients)\n"
        ));
        explain_api(table, Api::Anthropic, model, &anthropic, &mut out);
    }
    Ok(out)
}

/// Candidates, transforms, deadline, affinity and fallbacks of `model`
/// among the clients that speak `api`.
fn explain_api(
    table: &RoutingTable,
    api: Api,
    model: &str,
    candidates: &crate::routing::table::CandidatesRef<'_>,
    out: &mut String,
) {
    let exact = candidates
        .in_priority_order()
        .any(|i| table.clients[i].cfg.model_match.kind == MatchKind::Exact);
    out.push_str(if exact {
        "  matched exactly (keyword and regex clients are not candidates)\n"
    } else {
        "  matched by keyword/regex\n"
    });
    out.push_str("candidates, in order:\n");
    for tier in &candidates.tiers {
        let total: u32 = tier.weights.iter().sum();
        out.push_str(&format!("  priority {}:\n", tier.priority));
        for (i, &ci) in tier.members.iter().enumerate() {
            let c = &table.clients[ci];
            let w = tier.weights[i];
            let keys: Vec<&str> = c.keys.iter().map(|k| k.id.as_str()).collect();
            out.push_str(&format!(
                "    {} — weight {w} ({:.0}% of this tier), {} key(s): {} [{}], {}\n",
                c.cfg.name,
                f64::from(w) * 100.0 / f64::from(total.max(1)),
                keys.len(),
                keys.join(", "),
                c.cfg.policy.key_strategy.as_str(),
                c.cfg.base_url,
            ));
            out.push_str(&format!(
                "        {}\n",
                matched_by(&c.cfg.model_match, model)
            ));
            for t in transforms(&c.cfg) {
                out.push_str(&format!("        {t}\n"));
            }
            for t in selection(c) {
                out.push_str(&format!("        {t}\n"));
            }
        }
    }
    if let Some(d) = table.config.routing.deadline {
        out.push_str(&format!(
            "deadline: {d:?} for all attempts and fallbacks before response headers (then 504)\n"
        ));
    }
    if let Some(a) = &table.config.routing.affinity {
        out.push_str(&format!(
            "affinity from {}: the same value goes to the same (client, key) while it is healthy\n",
            a.describe()
        ));
    }
    out.push_str(&fallback_chain(table, api, model));
}

/// Which of the client's `model_match` values matched `model`: the first,
/// as the router checks them in order.
fn matched_by(rule: &MatchRule, model: &str) -> String {
    let value = match rule.kind {
        MatchKind::Exact => rule.values.iter().find(|v| *v == model),
        MatchKind::Keyword => rule.values.iter().find(|v| model.contains(v.as_str())),
        MatchKind::Regex => rule
            .regexes
            .iter()
            .position(|r| r.is_match(model))
            .and_then(|i| rule.values.get(i)),
    };
    let kind = match rule.kind {
        MatchKind::Exact => "exact",
        MatchKind::Keyword => "keyword",
        MatchKind::Regex => "regex",
    };
    match value {
        Some(v) => format!("matched by {kind} `{v}`"),
        None => format!("matched by {kind}"),
    }
}

fn transforms(c: &crate::config::ClientConfig) -> Vec<String> {
    let mut t = Vec::new();
    if let Some(m) = &c.upstream_model {
        t.push(format!("sends model `{m}` upstream"));
    }
    if let Some(p) = &c.special_prefix {
        t.push(format!("special_prefix {p:?}"));
    }
    if let Some(s) = &c.stop {
        t.push(format!("stop {s:?} when the request has none"));
    }
    if let Some(m) = c.max_tokens {
        t.push(format!("max_tokens {m} when the request has none"));
    }
    if !c.extra_body.is_empty() {
        let keys: Vec<&str> = c.extra_body.keys().map(String::as_str).collect();
        t.push(format!("extra_body: {}", keys.join(", ")));
    }
    if !c.headers.is_empty() {
        let names: Vec<&str> = c.headers.iter().map(|(n, _)| n.as_str()).collect();
        t.push(format!("extra headers: {}", names.join(", ")));
    }
    t
}

/// How the client's keys and its tier are chosen beyond the strategy,
/// and each key's quota reading when this table has one.
fn selection(c: &crate::routing::ClientRoute) -> Vec<String> {
    let p = &c.cfg.policy;
    let mut t = Vec::new();
    if let Some(a) = &p.affinity {
        t.push(format!("affinity from {}", a.describe()));
    }
    if p.balance == crate::config::Balance::Latency {
        t.push("balance: latency (two choices by time to first byte)".to_owned());
    }
    if let Some(d) = p.first_token_timeout {
        t.push(format!("first_token_timeout {d:?} for streams"));
    }
    let mut read = false;
    for k in &c.keys {
        let q = k.health.quota();
        let fig = |r: Option<crate::routing::key_health::Remaining>| {
            r.map_or("-".to_owned(), |r| {
                format!("{} (resets in {:?})", r.left, r.resets_in)
            })
        };
        if q.requests.is_some() || q.tokens.is_some() {
            read = true;
            t.push(format!(
                "quota of {}: requests {}, tokens {}",
                k.id,
                fig(q.requests),
                fig(q.tokens)
            ));
        }
    }
    if !read && p.key_strategy == crate::config::KeyStrategy::Headroom {
        t.push(
            "quota: no reading yet (read from upstream responses; a running gateway shows them in /admin/status)"
                .to_owned(),
        );
    }
    t
}

/// The fallback walk the proxy would make, depth first, with skips marked.
fn fallback_chain(table: &RoutingTable, api: Api, model: &str) -> String {
    let max_depth = table.config.routing.max_fallback_depth;
    let mut out = String::from("fallback chain when every candidate fails:\n");
    let mut tried = vec![model.to_owned()];
    let mut lines = Vec::new();
    walk(table, api, model, 0, max_depth, &mut tried, &mut lines);
    if lines.is_empty() {
        out.push_str("  none: the request ends with 502 (or 503 when every key is cooling down)\n");
    }
    for l in lines {
        out.push_str(&l);
    }
    out
}

fn walk(
    table: &RoutingTable,
    api: Api,
    model: &str,
    depth: u32,
    max_depth: u32,
    tried: &mut Vec<String>,
    lines: &mut Vec<String>,
) {
    let candidates = table.candidates_of(api, model);
    let fallback = table.fallback_of(&candidates);
    let indent = "  ".repeat(depth as usize + 1);
    for f in fallback {
        if depth + 1 > max_depth {
            lines.push(format!(
                "{indent}-> {f}: not tried, max_fallback_depth {max_depth} reached\n"
            ));
            continue;
        }
        if tried.contains(f) {
            lines.push(format!(
                "{indent}-> {f}: skipped, already tried in this request (cycle)\n"
            ));
            continue;
        }
        tried.push(f.clone());
        let names: Vec<&str> = table
            .candidates_of(api, f)
            .order()
            .into_iter()
            .map(|i| table.clients[i].cfg.name.as_str())
            .collect();
        let served = if names.is_empty() {
            "no client matches it".to_owned()
        } else {
            names.join(", ")
        };
        lines.push(format!("{indent}-> {f} (depth {}): {served}\n", depth + 1));
        walk(table, api, f, depth + 1, max_depth, tried, lines);
    }
}

/// Every model name the config mentions: exact and keyword values, fallbacks.
fn known_names(table: &RoutingTable) -> Vec<String> {
    let mut names: Vec<String> = table
        .clients
        .iter()
        .flat_map(|c| {
            let values = match c.cfg.model_match.kind {
                MatchKind::Regex => Vec::new(),
                _ => c.cfg.model_match.values.clone(),
            };
            values.into_iter().chain(c.cfg.fallback.iter().cloned())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
