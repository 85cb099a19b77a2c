//! Callers: tokens, model allow-lists, rate limits and budgets held under
//! concurrency, prices and cost in the usage rows, spend kept across reloads.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn month() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7].to_owned()
}

/// `(caller, status, cost_usd, reserved_usd, cached_tokens, error)` of every row.
type Row = (
    Option<String>,
    i64,
    Option<f64>,
    Option<f64>,
    Option<i64>,
    Option<String>,
);

fn rows(dir: &Path) -> Vec<Row> {
    let db =
        rusqlite::Connection::open(dir.join(format!("usage/usage-{}.sqlite", month()))).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT caller, status, cost_usd, reserved_usd, cached_tokens, error FROM requests ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn chat_as(gw: &Gateway, token: &str, body: Value) -> Reply2 {
    post_with(
        &gw.url("/v1/chat/completions"),
        body,
        &[("authorization", &bearer(token))],
    )
    .await
}

fn config(up: &MockUpstream, callers: &str, extra_top: &str) -> String {
    format!(
        "usage:\n  dir: ./usage\n{extra_top}callers:\n{callers}openai_clients:\n{}{}",
        client_yaml(
            "main",
            &up.url(),
            &["sk-upstream"],
            "model_match: { type: exact, value: [gpt-4o, gpt-4o-mini, o3] }",
        ),
        client_yaml(
            "other",
            &up.url(),
            &["sk-other"],
            "model_match: { type: keyword, value: [deepseek] }",
        )
    )
}

#[tokio::test]
async fn allow_lists_refuse_other_models_and_filter_the_model_list() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        "  - { name: app, token: tok-app-0123456789, models: [\"gpt-4o*\"] }\n  - { name: all, token: tok-all-0123456789 }\n",
        "",
    ))
    .await;
    let r = chat_as(&gw, "tok-app-0123456789", chat("o3")).await;
    assert_eq!(r.status, 403);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "permission_error");
    assert_eq!(e["code"], "model_not_allowed");
    assert_eq!(e["param"], "model");
    assert_eq!(up.count(), 0, "a refused request reaches no upstream");
    let r = chat_as(&gw, "tok-app-0123456789", chat("gpt-4o-mini")).await;
    assert_eq!(r.status, 200);
    let models = |token: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            let r = get(&url, &[("authorization", &bearer(token))]).await;
            let mut ids: Vec<String> = r.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        models("tok-app-0123456789").await,
        ["gpt-4o", "gpt-4o-mini"]
    );
    assert_eq!(
        models("tok-all-0123456789").await,
        ["gpt-4o", "gpt-4o-mini", "o3"]
    );
    let r = get(
        &gw.url("/v1/models/o3"),
        &[("authorization", &bearer("tok-app-0123456789"))],
    )
    .await;
    assert_eq!(r.status, 404);
    // Missing and wrong tokens: 401, no row.
    let r = post(&gw.url("/v1/chat/completions"), chat("gpt-4o")).await;
    assert_eq!(r.status, 401);
    let r = chat_as(&gw, "tok-nobody", chat("gpt-4o")).await;
    assert_eq!(r.status, 401);
    let metrics = get(
        &gw.url("/metrics"),
        &[("authorization", &bearer("tok-all-0123456789"))],
    )
    .await;
    let text = metrics.text();
    assert!(
        text.contains("gptbalance_auth_failures_total{reason=\"missing\"} 1"),
        "{text}"
    );
    assert!(text.contains("gptbalance_auth_failures_total{reason=\"invalid\"} 1"));
    assert!(text.contains(
        "gptbalance_caller_rejections_total{caller=\"app\",reason=\"model_not_allowed\"} 1"
    ));
    let dir = gw.stop().await;
    let rows = rows(dir.path());
    let statuses: Vec<(Option<String>, i64)> = rows.iter().map(|r| (r.0.clone(), r.1)).collect();
    assert_eq!(
        statuses,
        [(Some("app".to_owned()), 403), (Some("app".to_owned()), 200)]
    );
    assert!(rows[0]
        .5
        .as_deref()
        .unwrap()
        .contains("may not use model `o3`"));
}

/// 32 requests at once against a budget with room for 10: exactly 10 are
/// admitted, and none is refused while room remains.
#[tokio::test]
async fn thirty_two_at_once_against_room_for_ten_admit_exactly_ten() {
    let up = MockUpstream::start("up").await;
    up.set_default(Reply::Delay(Duration::from_millis(1500)));
    let body = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let reserve = (body.to_string().len() as u64).div_ceil(3) + 100;
    let gw = Gateway::start(&config(
        &up,
        &format!(
            "  - name: batch\n    token: tok-batch-0123456789\n    limits: {{ budget_tokens: {{ amount: {}, per: month }} }}\n",
            reserve * 10
        ),
        "",
    ))
    .await;
    let url = gw.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                post_with(
                    &url,
                    body,
                    &[("authorization", "Bearer tok-batch-0123456789")],
                )
                .await
            })
        })
        .collect();
    let mut admitted = 0;
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => admitted += 1,
            429 => {
                refused += 1;
                assert_eq!(r.json()["error"]["type"], "insufficient_quota");
                assert_eq!(r.headers["x-should-retry"], "false");
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert_eq!((admitted, refused), (10, 22));
    assert_eq!(up.count(), 10);
    // Settled at the 18 tokens each used: room again.
    let r = chat_as(&gw, "tok-batch-0123456789", body.clone()).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn concurrency_and_rpm_limits_with_openai_headers() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        "  - name: rpm\n    token: tok-rpm-0123456789\n    limits: { rpm: 3, tpm: 100000 }\n  - name: conc\n    token: tok-conc-0123456789\n    limits: { concurrency: 2 }\n",
        "",
    ))
    .await;
    for i in 0..3 {
        let r = chat_as(&gw, "tok-rpm-0123456789", chat("gpt-4o")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            r.headers["x-ratelimit-remaining-requests"],
            (2 - i).to_string().as_str()
        );
        assert_eq!(r.headers["x-ratelimit-reset-requests"], "1m0s");
        assert_eq!(r.headers["x-ratelimit-limit-tokens"], "100000");
        assert!(r.headers.contains_key("x-ratelimit-remaining-tokens"));
    }
    let r = chat_as(&gw, "tok-rpm-0123456789", chat("gpt-4o")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    // Two in flight (held by a gate), the third refused; streams count
    // until their last byte.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..2 {
        up.push(Reply::Sse {
            events: vec![chat_chunk("a"), usage_chunk(1, 1), DONE.to_owned()],
            gate: Some(gate.clone()),
            abort_at_end: false,
        });
    }
    let open = |gw: &Gateway| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let req = post_req(
                &url,
                json!({"model": "gpt-4o", "stream": true, "messages": []}).to_string(),
                &[("authorization", "Bearer tok-conc-0123456789")],
            );
            client().request(req).await.unwrap()
        }
    };
    let mut s1 = open(&gw).await;
    let mut s2 = open(&gw).await;
    assert_eq!((s1.status().as_u16(), s2.status().as_u16()), (200, 200));
    let r = chat_as(&gw, "tok-conc-0123456789", chat("gpt-4o")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    gate.add_permits(10);
    read_all(s1.body_mut()).await.unwrap();
    read_all(s2.body_mut()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || {
            let t = gw.state.table.load();
            let c = t.caller("conc").unwrap();
            c.state
                .snapshot(std::time::SystemTime::now(), gptbalance::config::Per::Month)
                .in_flight
                == 0
        })
        .await
    );
    let r = chat_as(&gw, "tok-conc-0123456789", chat("gpt-4o")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn costs_count_cached_tokens_and_budgets_in_usd_hold() {
    let up = MockUpstream::start("up").await;
    // 1000 prompt tokens (400 cached) and 100 completion tokens.
    let answer = json!({
        "id": "x", "object": "chat.completion", "choices": [],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                  "prompt_tokens_details": {"cached_tokens": 400},
                  "completion_tokens_details": {"reasoning_tokens": 30}}
    });
    up.set_default(Reply::Json(200, answer));
    // Each answer costs 600*0.15 + 400*0.075 + 100*0.6 = 180 $/M = $0.00018.
    let prices = "prices:\n  \"gpt-4o*\": { input: 0.15, cached_input: 0.075, output: 0.60 }\n  \"deepseek-*\": { input: 1, output: 1 }\n  o3: { input: 2, output: 8 }\n";
    let gw = Gateway::start(&config(
        &up,
        "  - name: spender\n    token: tok-spend-0123456789\n    limits: { budget_usd: { amount: 0.0005, per: day } }\n    max_tokens_default: 10\n",
        prices,
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            chat_as(&gw, "tok-spend-0123456789", chat("gpt-4o"))
                .await
                .status,
        );
    }
    // $0.00018 each: the third still fits (0.00036 + its small reservation),
    // the fourth does not (0.00054 > 0.0005).
    assert_eq!(statuses, [200, 200, 200, 429]);
    let status = get(
        &gw.url("/admin/status"),
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(status.status, 404, "no admin token configured");
    let snap = gw
        .state
        .table
        .load()
        .caller("spender")
        .unwrap()
        .state
        .snapshot(std::time::SystemTime::now(), gptbalance::config::Per::Day);
    assert_eq!(snap.spent_nanos, 3 * 180_000);
    assert_eq!(snap.reserved_nanos, 0);
    // A keyword-matched model without a price: refused for a USD budget.
    let r = chat_as(&gw, "tok-spend-0123456789", chat("unpriced-deepseek")).await;
    assert_eq!(r.status, 403);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has no price"));
    let dir = gw.stop().await;
    let rows = rows(dir.path());
    assert_eq!(rows.len(), 5);
    for r in &rows[..3] {
        assert_eq!(r.1, 200);
        assert!((r.2.unwrap() - 0.00018).abs() < 1e-12, "{r:?}");
        assert!(r.3.unwrap() > 0.0);
        assert_eq!(r.4, Some(400));
    }
    assert_eq!(rows[3].1, 429);
    assert_eq!(rows[4].1, 403);
}

#[tokio::test]
async fn a_response_without_usage_settles_at_its_reservation_and_errors_refund() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        "  - name: t\n    token: tok-t-0123456789\n    limits: { budget_tokens: { amount: 1000000, per: month } }\n",
        "",
    ))
    .await;
    up.push(Reply::Json(200, json!({"id": "no-usage"})));
    up.push(Reply::Json(400, json!({"error": {"message": "bad"}})));
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "messages": []});
    let reserve = (body.to_string().len() as u64).div_ceil(3) + 50;
    assert_eq!(
        chat_as(&gw, "tok-t-0123456789", body.clone()).await.status,
        200
    );
    assert_eq!(
        chat_as(&gw, "tok-t-0123456789", body.clone()).await.status,
        400
    );
    let snap = |gw: &Gateway| {
        gw.state
            .table
            .load()
            .caller("t")
            .unwrap()
            .state
            .snapshot(std::time::SystemTime::now(), gptbalance::config::Per::Month)
    };
    assert_eq!(snap(&gw).spent_tokens, reserve);
    assert_eq!(
        chat_as(&gw, "tok-t-0123456789", body.clone()).await.status,
        200
    );
    assert_eq!(snap(&gw).spent_tokens, reserve + 18);
    let dir = gw.stop().await;
    let rows = rows(dir.path());
    assert_eq!(rows[0].5.as_deref(), Some("usage unknown"));
}

/// A reload that edits a caller's limits keeps what it spent; a restart
/// reads it back from the usage file.
#[tokio::test]
async fn spend_survives_reloads_and_restarts() {
    let up = MockUpstream::start("up").await;
    let yaml = |amount: u64| {
        config(
            &up,
            &format!("  - name: t\n    token: tok-t-0123456789\n    limits: {{ budget_tokens: {{ amount: {amount}, per: month }} }}\n"),
            "",
        )
    };
    let gw = Gateway::start(&yaml(100)).await;
    for _ in 0..5 {
        assert_eq!(
            chat_as(
                &gw,
                "tok-t-0123456789",
                json!({"model": "gpt-4o", "max_tokens": 1, "messages": []})
            )
            .await
            .status,
            200
        );
    }
    let spent = |gw: &Gateway| {
        gw.state
            .table
            .load()
            .caller("t")
            .unwrap()
            .state
            .snapshot(std::time::SystemTime::now(), gptbalance::config::Per::Month)
            .spent_tokens
    };
    assert_eq!(spent(&gw), 90);
    std::fs::write(gw.config_path(), yaml(200)).unwrap();
    assert!(gw.wait_generation(2).await);
    assert_eq!(spent(&gw), 90, "a reload keeps what was spent");
    let config_text = yaml(200);
    let dir = gw.stop().await;
    // A new gateway on the same usage directory starts from the file.
    std::fs::write(dir.path().join("config.yaml"), &config_text).unwrap();
    let loaded = gptbalance::config::load(&dir.path().join("config.yaml")).unwrap();
    let table = gptbalance::routing::RoutingTable::build(loaded.config, None);
    gptbalance::cli::serve::restore_spend(&table, &dir.path().join("usage"));
    let snap = table
        .caller("t")
        .unwrap()
        .state
        .snapshot(std::time::SystemTime::now(), gptbalance::config::Per::Month);
    assert_eq!(snap.spent_tokens, 90);
}

#[tokio::test]
async fn bare_tokens_get_stable_names_and_no_token_is_ever_shown() {
    let up = MockUpstream::start("up").await;
    let token = "tok-bare-secret-0123456789";
    let gw = Gateway::start(&format!(
        "server:\n  auth_tokens: [\"{token}\"]\n  admin_token: admin-secret-0123456789\n{}",
        config(
            &up,
            "  - name: named\n    token: tok-named-secret-0123456789\n    limits: { rpm: 100 }\n",
            "",
        )
    ))
    .await;
    let r = chat_as(&gw, token, chat("gpt-4o")).await;
    assert_eq!(r.status, 200);
    let r = chat_as(
        &gw,
        "tok-named-secret-0123456789",
        chat("nothing-serves-this"),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = chat_as(&gw, "tok-named-secret-0123456789", chat("gpt-4o")).await;
    assert_eq!(r.status, 200);
    let status = get(
        &gw.url("/admin/status"),
        &[("authorization", "Bearer admin-secret-0123456789")],
    )
    .await;
    let json = status.json();
    let names: Vec<&str> = json["callers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let digest = gptbalance::secret::sha256(token.as_bytes());
    let bare = gptbalance::secret::token_name(&digest);
    assert!(bare.starts_with("token-") && bare.len() == 14, "{bare}");
    let names_owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    assert_eq!(names_owned, ["named".to_owned(), bare.clone()]);
    assert_eq!(json["callers"][0]["rpm_used"], 1);
    let metrics = get(&gw.url("/metrics"), &[("authorization", &bearer(token))]).await;
    let dir = gw.stop().await;
    let rows = rows(dir.path());
    assert_eq!(rows[0].0.as_deref(), Some(bare.as_str()));
    let mut seen = status.text() + &metrics.text();
    seen.push_str(&format!("{rows:?}"));
    let file = std::fs::read(dir.path().join(format!("usage/usage-{}.sqlite", month()))).unwrap();
    seen.push_str(&String::from_utf8_lossy(&file));
    for secret in [
        token,
        "tok-named-secret-0123456789",
        "admin-secret-0123456789",
        "sk-upstream",
    ] {
        assert!(!seen.contains(secret), "{secret} leaked");
    }
}

/// Every kind of bad caller or price config is a line:col diagnostic.
#[test]
fn bad_caller_and_price_configs_are_diagnosed() {
    let base = "openai_clients:\n  - { name: c, base_url: \"http://h\", api_key: k, model_match: { type: exact, value: [m, n] } }\n";
    let check = |extra: &str, want: &str| {
        let text = format!("{extra}{base}");
        let diags = match gptbalance::config::load_str(&text, Path::new("t.yaml"), &|_| None) {
            Ok(l) => l.warnings,
            Err(d) => d,
        };
        let all: Vec<String> = diags.iter().map(ToString::to_string).collect();
        assert!(
            all.iter()
                .any(|d| d.contains(want) && d.starts_with("t.yaml:")),
            "{extra}: want `{want}` in {all:#?}"
        );
    };
    check(
        "callers:\n  - { name: a, token: \"\" }\n",
        "the token is empty",
    );
    check(
        "callers:\n  - { name: a, token: same-token-01234 }\n  - { name: b, token: same-token-01234 }\n",
        "same token as callers[0]",
    );
    check(
        "server:\n  auth_tokens: [both-places-0123456]\ncallers:\n  - { name: a, token: both-places-0123456 }\n",
        "also the token of callers[0]",
    );
    check(
        "callers:\n  - { name: a, token_sha256: abc }\n",
        "64 hex digits",
    );
    check("callers:\n  - { name: a }\n", "has no token");
    check(
        "callers:\n  - { name: a, token: t-0123456789abcdef, limits: { rpm: 0 } }\n",
        "limits.rpm must be a whole number from 1",
    );
    check(
        "callers:\n  - { name: a, token: t-0123456789abcdef, limits: { tpm: -5 } }\n",
        "limits.tpm must be a whole number from 1",
    );
    check(
        "callers:\n  - { name: a, token: t-0123456789abcdef, limits: { budget_usd: { amount: 5, per: week } } }\n",
        "unknown variant `week`",
    );
    check(
        "callers:\n  - { name: a, token: t-0123456789abcdef, limits: { rpn: 5 } }\n",
        "did you mean `rpm`",
    );
    check(
        "prices:\n  m: { input: -1, output: 1 }\n",
        "cannot be negative",
    );
    check(
        "prices:\n  m: { input: lots, output: 1 }\n",
        "expected a number",
    );
    check(
        "prices:\n  m: { input: 1, output: 1 }\ncallers:\n  - { name: a, token: t-0123456789abcdef, limits: { budget_usd: { amount: 5, per: month } } }\n",
        "model `n` (client `c`) has no price",
    );
    check(
        "prices:\n  m: { input: 1, output: 1 }\n",
        "warning: client `c`: no price for `n`",
    );
    check(
        "callers:\n  - { name: a, token: t-0123456789abcdef, models: [\"zzz*\"] }\n",
        "warning: caller `a`: `zzz*` matches no model",
    );
    // A valid one loads, with a token given only as its digest.
    let digest: String = gptbalance::secret::sha256(b"t-0123456789abcdef")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = format!(
        "prices:\n  \"*\": {{ input: 1, output: 2 }}\ncallers:\n  - {{ name: a, token_sha256: \"{digest}\", models: [m], limits: {{ rpm: 5, budget_usd: {{ amount: 2.5, per: month }} }} }}\n{base}"
    );
    let loaded = gptbalance::config::load_str(&text, Path::new("t.yaml"), &|_| None).unwrap();
    let c = &loaded.config.callers[0];
    assert_eq!(
        c.token_sha256,
        gptbalance::secret::sha256(b"t-0123456789abcdef")
    );
    assert_eq!(c.limits.budget_usd.unwrap().amount, 2_500_000_000);
    assert!(c.allows("m") && !c.allows("n"));
}

/// An absurd `max_tokens` is reserved as asked, refused by the budget, and
/// overflows nothing.
#[tokio::test]
async fn an_absurd_max_tokens_is_refused_without_overflow() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        "  - name: t\n    token: tok-t-0123456789\n    limits: { tpm: 1000, budget_tokens: { amount: 100000, per: day }, budget_usd: { amount: 10, per: month } }\n",
        "prices:\n  \"*\": { input: 1000, output: 1000 }\n",
    ))
    .await;
    let r = chat_as(
        &gw,
        "tok-t-0123456789",
        json!({"model": "gpt-4o", "max_tokens": 1_000_000_000_000u64, "messages": []}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    assert_eq!(up.count(), 0);
    let r = chat_as(
        &gw,
        "tok-t-0123456789",
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// `gptbalance usage` shows each caller's cost, and `--reprice` recomputes
/// it with the config's current prices without touching the files.
#[tokio::test]
async fn usage_reports_cost_and_reprices_without_writing() {
    let up = MockUpstream::start("up").await;
    let yaml = |input: f64| {
        config(
            &up,
            "  - { name: a, token: tok-a-0123456789 }\n  - { name: b, token: tok-b-0123456789 }\n",
            &format!("prices:\n  \"*\": {{ input: {input}, output: 0 }}\n"),
        )
    };
    let gw = Gateway::start(&yaml(1.0)).await;
    // Each answer: 11 prompt tokens at $1/M.
    for token in ["tok-a-0123456789", "tok-a-0123456789", "tok-b-0123456789"] {
        assert_eq!(chat_as(&gw, token, chat("gpt-4o")).await.status, 200);
    }
    let dir = gw.stop().await;
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml(1.0)).unwrap();
    let file = dir.path().join(format!("usage/usage-{}.sqlite", month()));
    let before = std::fs::read(&file).unwrap();
    let usage = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gptbalance"))
            .args([
                "usage",
                "--config",
                config.to_str().unwrap(),
                "--by",
                "caller",
                "--format",
                "json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let cost = |g: &str| {
            v["groups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["group"] == g)
                .unwrap()["cost_usd"]
                .as_f64()
                .unwrap()
        };
        (
            cost("a"),
            cost("b"),
            v["total"]["cost_usd"].as_f64().unwrap(),
        )
    };
    let (a, b, total) = usage(&[]);
    assert!(
        (a - 22e-6).abs() < 1e-12 && (b - 11e-6).abs() < 1e-12,
        "{a} {b}"
    );
    assert!((total - 33e-6).abs() < 1e-12);
    std::fs::write(&config, yaml(3.0)).unwrap();
    let (a, _, total) = usage(&["--reprice"]);
    assert!((a - 66e-6).abs() < 1e-12, "{a}");
    assert!((total - 99e-6).abs() < 1e-12);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "--reprice writes nothing"
    );
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_gptbalance"))
        .args([
            "usage",
            "--config",
            config.to_str().unwrap(),
            "--by",
            "caller",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("COST_USD"));
}

#[tokio::test]
async fn ratelimit_headers_are_the_same_on_both_server_paths() {
    let up = MockUpstream::start("up").await;
    // Two callers with the same limits and fresh counters: one asks over
    // HTTP/1.1 (the gateway's own loop), the other over HTTP/1.0 (handed
    // to hyper). The upstream's own quota headers are replaced.
    let gw = Gateway::start(&config(
        &up,
        "  - name: a\n    token: tok-one-0123456789\n    limits: { rpm: 5, tpm: 100000 }\n  - name: b\n    token: tok-two-0123456789\n    limits: { rpm: 5, tpm: 100000 }\n",
        "",
    ))
    .await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let mut seen = Vec::new();
    for (version, token) in [("1.1", "tok-one-0123456789"), ("1.0", "tok-two-0123456789")] {
        up.push(Reply::Raw(
            200,
            vec![
                ("x-ratelimit-remaining-requests".to_owned(), "98".to_owned()),
                ("x-ratelimit-remaining-tokens".to_owned(), "99".to_owned()),
            ],
            r#"{"ok":true}"#.to_owned(),
        ));
        let request = format!(
            "POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = raw_exchange(gw.addr, request.as_bytes()).await;
        let (head, _) = text.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with(&format!("HTTP/{version} 200")), "{head}");
        let mut lines: Vec<String> = head
            .lines()
            .skip(1)
            .map(str::to_ascii_lowercase)
            .filter(|l| l.starts_with("x-ratelimit-"))
            .collect();
        lines.sort();
        seen.push(lines);
    }
    assert_eq!(seen[0], seen[1]);
    let lines = &seen[0];
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert_eq!(lines[0], "x-ratelimit-limit-requests: 5");
    assert_eq!(lines[1], "x-ratelimit-limit-tokens: 100000");
    assert_eq!(lines[2], "x-ratelimit-remaining-requests: 4");
    let tokens: u64 = lines[3]
        .strip_prefix("x-ratelimit-remaining-tokens: ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(tokens < 100_000 && tokens != 99, "{lines:?}");
    assert_eq!(lines[4], "x-ratelimit-reset-requests: 1m0s");
    assert!(
        lines[5].starts_with("x-ratelimit-reset-tokens: "),
        "{lines:?}"
    );
    assert_eq!(up.count(), 2);
}
