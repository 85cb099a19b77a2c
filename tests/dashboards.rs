//! `examples/grafana/gptbalance.json` and `examples/prometheus/alerts.yaml`:
//! every metric they name exists in `/metrics` after traffic, the dashboard
//! is a well-formed Grafana dashboard, and the alert rules pass
//! `promtool check rules` (when promtool is installed; `.ci/run` installs
//! it and sets GPTBALANCE_REQUIRE_PROMTOOL=1) and a structure check.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn example(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every `gptbalance_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"gptbalance_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// Every PromQL expression of the dashboard: its panels' targets, its
/// variables' queries and its annotations.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        out.push(a["expr"].as_str().unwrap().to_owned());
    }
    out
}

fn alert_rules(text: &str) -> Vec<serde_yaml::Value> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let groups = doc["groups"].as_sequence().expect("groups: a list");
    assert!(!groups.is_empty());
    groups
        .iter()
        .flat_map(|g| {
            assert!(g["name"].as_str().is_some_and(|n| !n.is_empty()));
            g["rules"].as_sequence().expect("rules: a list").clone()
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_exported_after_traffic() {
    let up = MockUpstream::start("up").await;
    let yaml = format!(
        "server:\n  admin_token: admin\nusage:\n  dir: ./usage\nprices:\n  m: {{ input: 1, output: 2 }}\ncallers:\n  - name: app\n    token: app-token\n    models: [m]\n    limits: {{ budget_usd: {{ amount: 100, per: month }}, budget_tokens: {{ amount: 100000, per: day }} }}\nopenai_clients:\n{}",
        client_yaml("c", &up.url(), &["k1", "k2"], "model_match: { type: exact, value: [m, other] }"),
    );
    let gw = Gateway::start(&yaml).await;
    let as_app = [("authorization", "Bearer app-token")];
    // A success with usage, a failover from a 429, a stream, a refusal by
    // the caller's allow-list, a bad token, a good and a failed reload.
    up.push(Reply::Ok);
    up.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "1".into())],
        "{}".into(),
    ));
    up.push(Reply::Ok);
    for _ in 0..2 {
        let r = post_with(&gw.url("/v1/chat/completions"), chat("m"), &as_app).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    up.push(Reply::Sse {
        events: vec![chat_chunk("hi"), usage_chunk(2, 1), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let mut s = open_stream_with(&gw, &as_app).await;
    read_all(s.body_mut()).await.unwrap();
    let r = post_with(&gw.url("/v1/chat/completions"), chat("other"), &as_app).await;
    assert_eq!(r.status, 403);
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("m"),
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(r.status, 401);
    let admin = [("authorization", "Bearer admin")];
    let reload_url = gw.url("/admin/reload");
    let r = send(post_req(&reload_url, String::new(), &admin)).await;
    assert_eq!(r.json()["last_reload"]["ok"], true);
    std::fs::write(gw.config_path(), "openai_clients: 3\n").unwrap();
    let r = send(post_req(&reload_url, String::new(), &admin)).await;
    assert_eq!(r.json()["last_reload"]["ok"], false);

    let metrics_url = gw.url("/metrics");
    // Usage rows are counted when the background writer commits them.
    let mut exported = String::new();
    for _ in 0..100 {
        exported = get(&metrics_url, &as_app).await.text();
        if exported.contains("gptbalance_usage_rows_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let series: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();

    let dashboard: Value =
        serde_json::from_str(&example("examples/grafana/gptbalance.json")).unwrap();
    let alerts = example("examples/prometheus/alerts.yaml");
    let mut named = BTreeSet::new();
    for e in dashboard_exprs(&dashboard) {
        named.extend(metric_names(&e));
    }
    let from_dashboard = named.len();
    for rule in alert_rules(&alerts) {
        named.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    assert!(from_dashboard >= 15, "{named:?}");
    let missing: Vec<&String> = named.iter().filter(|n| !series.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "not in /metrics: {missing:?}\n{exported}"
    );
}

async fn open_stream_with(
    gw: &Gateway,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let mut body = chat("m");
    body["stream"] = true.into();
    let req = post_req(&gw.url("/v1/chat/completions"), body.to_string(), headers);
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let d: Value = serde_json::from_str(&example("examples/grafana/gptbalance.json")).unwrap();
    assert_eq!(d["uid"], "gptbalance");
    assert!(d["schemaVersion"].as_u64().is_some());
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id {p}");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("gptbalance_"), "{expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{expr}"
            );
        }
    }
    // Latency and TTFT percentiles come from the histograms.
    let all = dashboard_exprs(&d).join("\n");
    for needle in [
        "histogram_quantile(0.95, sum by (le, client) (rate(gptbalance_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, client) (rate(gptbalance_ttft_seconds_bucket",
        "gptbalance_caller_spend_usd_total",
        "gptbalance_key_healthy",
    ] {
        assert!(all.contains(needle), "{needle}");
    }
}

#[test]
fn the_alert_rules_are_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prometheus/alerts.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let rules = alert_rules(&text);
    let mut names = BTreeSet::new();
    for r in &rules {
        let name = r["alert"].as_str().expect("every rule is an alert");
        assert!(names.insert(name.to_owned()), "duplicate alert {name}");
        assert!(
            r["expr"]
                .as_str()
                .is_some_and(|e| e.contains("gptbalance_")),
            "{name}"
        );
        assert!(
            ["critical", "warning", "info"]
                .contains(&r["labels"]["severity"].as_str().unwrap_or("")),
            "{name}"
        );
        assert!(r["annotations"]["summary"].as_str().is_some(), "{name}");
        if let Some(f) = r.get("for") {
            gptbalance::config::schema::parse_duration(f.as_str().unwrap()).unwrap();
        }
    }
    for wanted in [
        "GptbalanceHighErrorRatio",
        "GptbalanceNoHealthyKeys",
        "GptbalanceBudgetAbove80Percent",
        "GptbalanceReloadFailed",
    ] {
        assert!(names.contains(wanted), "{wanted}");
    }
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(
                std::env::var_os("GPTBALANCE_REQUIRE_PROMTOOL").is_none(),
                "promtool is required (apt-get install prometheus)"
            );
            eprintln!("promtool not installed: checked the rules' structure only");
        }
    }
}
