//! What a config change would do: the settings that differ, and the models
//! whose route (candidate order, fallback chain) would change.
//!
//! Works on two effective configs ([`crate::config::effective`]), so the
//! running daemon's (`GET /admin/config`) and a file's compare alike, and
//! nothing secret is ever in the input or the output.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::effective::routing_clients;
use crate::config::matcher;
use crate::config::ClientConfig;

/// One setting or entity that differs. `before` or `after` is `null` for
/// something added or removed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// `client`, `key`, `caller`, `price`, `server`, `routing`, `usage`, `logging`.
    pub kind: String,
    pub name: String,
    pub before: Value,
    pub after: Value,
}

/// A model whose route differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteChange {
    pub model: String,
    /// Candidate clients in the order they are tried (priority, then
    /// weight within a priority).
    pub before: Vec<String>,
    pub after: Vec<String>,
    /// The models tried after every candidate failed, in order.
    pub fallback_before: Vec<String>,
    pub fallback_after: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diff {
    pub equal: bool,
    pub changes: Vec<Change>,
    pub routes: Vec<RouteChange>,
}

/// Compares `before` with `after`; routes are compared for every exact
/// model name and fallback target of either, and for `seen` (models from
/// the usage files).
pub fn diff(before: &Value, after: &Value, seen: &[String]) -> Diff {
    let mut changes = Vec::new();
    for section in ["server", "routing", "usage", "logging", "shared_state"] {
        settings(section, &before[section], &after[section], &mut changes);
    }
    if before["shadow"] != after["shadow"] {
        changes.push(change(
            "shadow",
            "shadow",
            Some(&before["shadow"]),
            Some(&after["shadow"]),
        ));
    }
    let empty = Map::new();
    let (pb, pa) = (
        before["prices"].as_object().unwrap_or(&empty),
        after["prices"].as_object().unwrap_or(&empty),
    );
    for name in pb.keys().chain(pa.keys()).collect::<BTreeSet<_>>() {
        let (b, a) = (pb.get(name), pa.get(name));
        if b != a {
            changes.push(change("price", name, b, a));
        }
    }
    named(
        "caller",
        &before["callers"],
        &after["callers"],
        &mut changes,
    );
    clients(&before["clients"], &after["clients"], &mut changes);

    let (cb, ca) = (routing_clients(before), routing_clients(after));
    let depth = |v: &Value| v["routing"]["max_fallback_depth"].as_u64().unwrap_or(3) as usize;
    let mut models: BTreeSet<String> = seen.iter().cloned().collect();
    for c in cb.iter().chain(&ca) {
        if c.model_match.kind == crate::config::MatchKind::Exact {
            models.extend(c.model_match.values.iter().cloned());
        }
        models.extend(c.fallback.iter().cloned());
    }
    let mut routes = Vec::new();
    for model in models {
        let (b, fb) = route(&cb, &model, depth(before));
        let (a, fa) = route(&ca, &model, depth(after));
        if b != a || fb != fa {
            routes.push(RouteChange {
                model,
                before: b,
                after: a,
                fallback_before: fb,
                fallback_after: fa,
            });
        }
    }
    Diff {
        equal: changes.is_empty() && routes.is_empty(),
        changes,
        routes,
    }
}

fn change(kind: &str, name: &str, before: Option<&Value>, after: Option<&Value>) -> Change {
    Change {
        kind: kind.to_owned(),
        name: name.to_owned(),
        before: before.cloned().unwrap_or(Value::Null),
        after: after.cloned().unwrap_or(Value::Null),
    }
}

/// Each key of a settings object that differs.
fn settings(kind: &str, before: &Value, after: &Value, out: &mut Vec<Change>) {
    let empty = Map::new();
    let (b, a) = (
        before.as_object().unwrap_or(&empty),
        after.as_object().unwrap_or(&empty),
    );
    for key in b.keys().chain(a.keys()).collect::<BTreeSet<_>>() {
        if b.get(key) != a.get(key) {
            out.push(change(kind, key, b.get(key), a.get(key)));
        }
    }
}

fn by_name(list: &Value) -> Vec<(&str, &Map<String, Value>)> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| Some((v["name"].as_str()?, v.as_object()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Entities of a list keyed by `name`: added, removed, or changed (then
/// only the fields that differ).
fn named(kind: &str, before: &Value, after: &Value, out: &mut Vec<Change>) {
    let (b, a) = (by_name(before), by_name(after));
    let find = |l: &[(&str, &Map<String, Value>)], n: &str| {
        l.iter().find(|(m, _)| *m == n).map(|(_, v)| (*v).clone())
    };
    let names: BTreeSet<&str> = b.iter().chain(&a).map(|(n, _)| *n).collect();
    for name in names {
        match (find(&b, name), find(&a, name)) {
            (Some(x), Some(y)) if x != y => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                let (mut fx, mut fy) = (Map::new(), Map::new());
                for k in keys {
                    if x.get(k) != y.get(k) {
                        fx.insert(k.clone(), x.get(k).cloned().unwrap_or(Value::Null));
                        fy.insert(k.clone(), y.get(k).cloned().unwrap_or(Value::Null));
                    }
                }
                out.push(change(
                    kind,
                    name,
                    Some(&Value::Object(fx)),
                    Some(&Value::Object(fy)),
                ));
            }
            (Some(_), Some(_)) => {}
            (x, y) => out.push(change(
                kind,
                name,
                x.map(Value::Object).as_ref(),
                y.map(Value::Object).as_ref(),
            )),
        }
    }
}

/// Clients as `named`, with their keys as changes of their own
/// (`client/key-…` added or removed).
fn clients(before: &Value, after: &Value, out: &mut Vec<Change>) {
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(list) = v.as_array_mut() {
            for c in list {
                if let Some(o) = c.as_object_mut() {
                    o.remove("keys");
                }
            }
        }
        v
    };
    named("client", &strip(before), &strip(after), out);
    let keys = |list: &Value| -> BTreeSet<String> {
        by_name(list)
            .into_iter()
            .flat_map(|(client, c)| {
                c.get("keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .map(move |k| format!("{client}/{k}"))
            })
            .collect()
    };
    let (kb, ka) = (keys(before), keys(after));
    for k in kb.difference(&ka) {
        out.push(change("key", k, Some(&Value::from("present")), None));
    }
    for k in ka.difference(&kb) {
        out.push(change("key", k, None, Some(&Value::from("present"))));
    }
}

/// A model's candidates in the order tried (priority tiers; within one,
/// heavier first, then file order) and its fallback chain.
pub fn route(
    clients: &[ClientConfig],
    model: &str,
    max_depth: usize,
) -> (Vec<String>, Vec<String>) {
    route_among(clients, model, max_depth, |m| {
        matcher::candidates(clients, m)
    })
}

/// [`route`] among the clients that speak `api`, as a request on one of
/// that API's endpoints is routed.
pub fn route_of(
    clients: &[ClientConfig],
    api: crate::config::Api,
    model: &str,
    max_depth: usize,
) -> (Vec<String>, Vec<String>) {
    route_among(clients, model, max_depth, |m| {
        matcher::candidates_of(clients, api, m)
    })
}

fn route_among(
    clients: &[ClientConfig],
    model: &str,
    max_depth: usize,
    candidates: impl Fn(&str) -> Vec<usize>,
) -> (Vec<String>, Vec<String>) {
    let order = |m: &str| -> Vec<usize> {
        let mut c = candidates(m);
        c.sort_by_key(|&i| (clients[i].priority, std::cmp::Reverse(clients[i].weight), i));
        c
    };
    let names = order(model)
        .into_iter()
        .map(|i| clients[i].name.clone())
        .collect();
    let mut chain: Vec<String> = Vec::new();
    let mut seen = vec![model.to_owned()];
    let mut frontier = vec![model.to_owned()];
    for _ in 0..max_depth {
        let mut next = Vec::new();
        for m in &frontier {
            let fallback = order(m)
                .into_iter()
                .map(|i| &clients[i].fallback)
                .find(|f| !f.is_empty());
            for f in fallback.into_iter().flatten() {
                if !seen.contains(f) {
                    seen.push(f.clone());
                    chain.push(f.clone());
                    next.push(f.clone());
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    (names, chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::effective::to_json;
    use std::path::Path;

    fn effective(yaml: &str) -> Value {
        to_json(
            &crate::config::load_str(yaml, Path::new("t.yaml"), &|_| None)
                .unwrap()
                .config,
        )
    }

    const BASE: &str = r#"
openai_clients:
  - { name: a, base_url: "http://h", api_key: k1, priority: 1, model_match: { type: exact, value: [m] }, fallback: [x] }
  - { name: b, base_url: "http://h", api_key: k2, priority: 2, model_match: { type: keyword, value: [m] } }
  - { name: c, base_url: "http://h", api_key: k3, model_match: { type: exact, value: [x] } }
"#;

    #[test]
    fn the_same_config_is_equal() {
        let d = diff(
            &effective(BASE),
            &effective(BASE),
            &["m".into(), "m2".into()],
        );
        assert!(d.equal, "{d:?}");
    }

    #[test]
    fn changes_name_what_moved_and_which_routes_differ() {
        let new = BASE
            .replace("priority: 2", "priority: 0")
            .replace("api_key: k3", "api_keys: [k3, k4]")
            + "routing:\n  cooldown: 5s\n";
        let d = diff(&effective(BASE), &effective(&new), &["m2".into()]);
        assert!(!d.equal);
        let kinds: Vec<(&str, &str)> = d
            .changes
            .iter()
            .map(|c| (c.kind.as_str(), c.name.as_str()))
            .collect();
        assert!(kinds.contains(&("routing", "cooldown")), "{kinds:?}");
        assert!(kinds.contains(&("client", "b")));
        assert!(kinds
            .iter()
            .any(|(k, n)| *k == "key" && n.starts_with("c/key-")));
        let b = d.changes.iter().find(|c| c.name == "b").unwrap();
        assert_eq!(b.before["priority"], 2);
        assert_eq!(b.after["priority"], 0);
        // `m` is served exactly by `a` either way; `m2` only by `b` (keyword)
        // either way: no route moved. A new exact client for m2 moves it.
        assert!(d.routes.is_empty(), "{:?}", d.routes);
        let moved = BASE.to_owned()
            + "  - { name: d, base_url: \"http://h\", api_key: k5, model_match: { type: exact, value: [m2] } }\n";
        let d = diff(&effective(BASE), &effective(&moved), &["m2".into()]);
        let r = d.routes.iter().find(|r| r.model == "m2").unwrap();
        assert_eq!(
            (r.before.clone(), r.after.clone()),
            (vec!["b".to_owned()], vec!["d".to_owned()])
        );
    }

    #[test]
    fn fallback_chains_are_followed_to_their_depth() {
        let clients = routing_clients(&effective(BASE));
        let (names, chain) = route(&clients, "m", 3);
        assert_eq!((names, chain), (vec!["a".to_owned()], vec!["x".to_owned()]));
    }
}
