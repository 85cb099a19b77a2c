//! What-if tools: `gptbalance diff` against a file and the running daemon,
//! `POST /admin/reload?dry_run=1`, and `gptbalance replay`.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("GPTBALANCE_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run_async(args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&a, &e)
    })
    .await
    .unwrap()
}

const SECRETS: [&str; 5] = [
    "sk-first-secret",
    "sk-second-secret",
    "admin-secret-0123456789",
    "caller-secret-0123456789",
    "header-secret-value",
];

fn old_config(url: &str) -> String {
    format!(
        "server:\n  admin_token: admin-secret-0123456789\nusage:\n  dir: ./usage\ncallers:\n  - {{ name: app, token: caller-secret-0123456789, limits: {{ rpm: 10 }} }}\nopenai_clients:\n{}{}",
        client_yaml(
            "a",
            url,
            &["sk-first-secret"],
            "priority: 1\nheaders: { api-key: header-secret-value }\nmodel_match: { type: keyword, value: [m] }\nfallback: [n2]",
        ),
        client_yaml(
            "b",
            url,
            &["sk-second-secret"],
            "priority: 2\nmodel_match: { type: keyword, value: [m] }",
        ),
    ) + &client_yaml(
        "c",
        url,
        &["sk-second-secret"],
        "model_match: { type: exact, value: [n2] }",
    )
}

fn new_config(url: &str) -> String {
    old_config(url)
        .replace("priority: 2", "priority: 0")
        .replace("rpm: 10", "rpm: 20")
}

#[tokio::test]
async fn diff_against_a_file_and_the_running_daemon() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&old_config(&up.url())).await;
    // A model seen in the usage files: routed only by keyword.
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("m-special"),
        &[("authorization", "Bearer caller-secret-0123456789")],
    )
    .await;
    assert_eq!(r.status, 200);
    let dir = gw.dir.path().to_owned();
    // Let the usage writer commit the row.
    assert!(
        eventually(std::time::Duration::from_secs(3), || {
            dir.join("usage")
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some())
        })
        .await
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let old = dir.join("old.yaml");
    let new = dir.join("new.yaml");
    std::fs::write(&old, old_config(&up.url())).unwrap();
    std::fs::write(&new, new_config(&up.url())).unwrap();
    let (s_old, s_new) = (old.display().to_string(), new.display().to_string());

    let (code, out, err) = run(&["diff", "--config", &s_old, "--against", &s_old], &[]);
    assert_eq!((code, out.trim()), (0, "no difference"), "{err}");

    let (code, out, err) = run(
        &[
            "diff",
            "--config",
            &s_new,
            "--against",
            &s_old,
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["equal"], false);
    let changes = d["changes"].as_array().unwrap();
    let has = |kind: &str, name: &str| {
        changes
            .iter()
            .any(|c| c["kind"] == kind && c["name"] == name)
    };
    assert!(has("client", "b") && has("caller", "app"), "{out}");
    let app = changes.iter().find(|c| c["name"] == "app").unwrap();
    assert_eq!(app["before"]["limits"]["rpm"], 10);
    assert_eq!(app["after"]["limits"]["rpm"], 20);
    // `m-special`, known only from the usage file, now goes to b first;
    // `n2`, an exact name, does not move.
    let routes = d["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{out}");
    assert_eq!(routes[0]["model"], "m-special");
    assert_eq!(routes[0]["before"], serde_json::json!(["a", "b"]));
    assert_eq!(routes[0]["after"], serde_json::json!(["b", "a"]));
    assert_eq!(routes[0]["fallback_before"], serde_json::json!(["n2"]));
    assert_eq!(routes[0]["fallback_after"], serde_json::json!(["n2"]));

    // Against the daemon: the same answer through GET /admin/config.
    let url = gw.url("");
    let (code, out2, err) = run_async(
        vec![
            "diff".into(),
            "--config".into(),
            s_new.clone(),
            "--admin".into(),
            url.clone(),
            "--format".into(),
            "json".into(),
        ],
        vec![(
            "GPTBALANCE_ADMIN_TOKEN".into(),
            "admin-secret-0123456789".into(),
        )],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let d2: Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(d2["changes"], d["changes"], "daemon and file compare alike");
    let (code, _, err) = run_async(
        vec![
            "diff".into(),
            "--config".into(),
            s_new.clone(),
            "--admin".into(),
            url,
            "--admin-token".into(),
            "wrong".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("admin token was refused"), "{err}");

    // The dry run: the file the daemon watches, compared, nothing applied.
    let generation = gw.generation();
    let text = new_config(&up.url());
    let path = gw.config_path();
    // Write where the watcher would reload it... then ask for a dry run
    // against a copy: the real file stays the old one.
    std::fs::write(dir.join("staged.yaml"), &text).unwrap();
    let admin = [("authorization", "Bearer admin-secret-0123456789")];
    let cfg = get(&gw.url("/admin/config"), &admin).await;
    assert_eq!(cfg.status, 200);
    let mut seen = cfg.text() + &out + &out2;
    let r = send(
        http::Request::post(gw.url("/admin/reload?dry_run=1"))
            .header("authorization", "Bearer admin-secret-0123456789")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["valid"], true);
    assert_eq!(r.json()["equal"], true, "the watched file is unchanged");
    seen.push_str(&r.text());
    assert_eq!(gw.generation(), generation, "a dry run applies nothing");
    // An invalid file is answered with its errors, and still nothing applied.
    std::fs::write(&path, "openai_clients: [").unwrap();
    let r = send(
        http::Request::post(gw.url("/admin/reload?dry_run=1"))
            .header("authorization", "Bearer admin-secret-0123456789")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["valid"], false);
    assert!(r.json()["errors"][0]
        .as_str()
        .unwrap()
        .contains("config.yaml:"));
    for s in SECRETS {
        assert!(!seen.contains(s), "{s} leaked");
    }
}

#[test]
fn diff_of_an_invalid_config_prints_its_errors_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "openai_clients:\n  - { name: a, base_url: \"http://h\", api_key: k, model_match: { type: exact, value: [m] }, prioirty: 1 }\n").unwrap();
    let ok = dir.path().join("ok.yaml");
    std::fs::write(&ok, "openai_clients:\n  - { name: a, base_url: \"http://h\", api_key: k, model_match: { type: exact, value: [m] } }\n").unwrap();
    let (code, _, err) = run(
        &[
            "diff",
            "--config",
            bad.to_str().unwrap(),
            "--against",
            ok.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.yaml:2:") && err.contains("prioirty"),
        "{err}"
    );
    let (code, _, err) = run(&["diff", "--config", ok.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--against"), "{err}");
    let _ = Path::new("");
}

fn record(
    ts: &str,
    caller: &str,
    model: &str,
    client: &str,
    p: u64,
    c: u64,
) -> gptbalance::usage::UsageRecord {
    gptbalance::usage::UsageRecord {
        ts: Some(humantime::parse_rfc3339(ts).unwrap()),
        request_id: format!("req-{ts}"),
        caller: Some(caller.into()),
        endpoint: "chat/completions".into(),
        model: Some(model.into()),
        routed_model: Some(model.into()),
        client: Some(client.into()),
        status: 200,
        attempts: 1,
        latency_ms: 500,
        prompt_tokens: Some(p),
        completion_tokens: Some(c),
        total_tokens: Some(p + c),
        cost_usd: Some(0.001),
        ..Default::default()
    }
}

/// Replay re-decides a month of rows under a new config: client shares,
/// unroutable models, refusals by the new limits on the rows' own clock,
/// projected cost; it sends nothing, and skips (and names) a foreign file.
#[tokio::test]
async fn replay_re_decides_recorded_rows_under_new_limits_and_prices() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let usage = dir.path().join("usage");
    std::fs::create_dir_all(&usage).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("usage-2026-04.sqlite"), b"not a database").unwrap();
    let mut rows = Vec::new();
    // `app` sends 5 requests within one minute, then one 2 minutes later.
    for i in 0..5 {
        rows.push(record(
            &format!("2026-04-10T10:00:{:02}.000Z", i * 5),
            "app",
            "gpt-4o",
            "old-client",
            1000,
            100,
        ));
    }
    rows.push(record(
        "2026-04-10T10:03:00.000Z",
        "app",
        "gpt-4o",
        "old-client",
        1000,
        100,
    ));
    // `ops` asks for a model the new config does not serve.
    rows.push(record(
        "2026-04-10T11:00:00.000Z",
        "ops",
        "retired-model",
        "old-client",
        10,
        10,
    ));
    // `app` may not use o3 under the new config.
    rows.push(record(
        "2026-04-10T12:00:00.000Z",
        "app",
        "o3",
        "old-client",
        10,
        10,
    ));
    let mut f =
        gptbalance::usage::store::UsageFile::open(&usage.join("usage-2026-04.sqlite")).unwrap();
    // Written out of time order: replay reads them in time order.
    let mut shuffled: Vec<&gptbalance::usage::UsageRecord> = rows.iter().collect();
    shuffled.reverse();
    f.insert_batch(&shuffled).unwrap();
    drop(f);
    let config = dir.path().join("new.yaml");
    std::fs::write(
        &config,
        format!(
            "usage:\n  dir: ./usage\nprices:\n  \"*\": {{ input: 1, output: 10 }}\ncallers:\n  - {{ name: app, token: app-token-0123456789, models: [\"gpt-*\"], limits: {{ rpm: 3 }} }}\n  - {{ name: ops, token: ops-token-0123456789 }}\nopenai_clients:\n{}{}",
            client_yaml("new-a", &up.url(), &["k1"], "weight: 1\nmodel_match: { type: exact, value: [gpt-4o, o3] }"),
            client_yaml("new-b", &up.url(), &["k2"], "weight: 1\nmodel_match: { type: exact, value: [gpt-4o] }"),
        ),
    )
    .unwrap();
    let (code, out, err) = run_async(
        vec![
            "replay".into(),
            "--config".into(),
            config.display().to_string(),
            "--dir".into(),
            usage.display().to_string(),
            "--dir".into(),
            other.display().to_string(),
            "--month".into(),
            "2026-04".into(),
            "--format".into(),
            "json".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"], 8);
    assert_eq!(v["before"]["clients"]["old-client"], 8);
    // rpm 3: the 4th and 5th of the first minute are refused; the one two
    // minutes later is not.
    assert_eq!(v["after"]["refused"]["app"]["rate_limit_exceeded"], 2);
    assert_eq!(v["after"]["refused"]["app"]["model_not_allowed"], 1);
    assert_eq!(v["after"]["unroutable"]["retired-model"], 1);
    let a = v["after"]["clients"]["new-a"].as_u64().unwrap_or(0);
    let b = v["after"]["clients"]["new-b"].as_u64().unwrap_or(0);
    assert_eq!(a + b, 4);
    assert_eq!(v["after"]["fallback_depth"]["0"], 4);
    // 4 routed rows of 1000 prompt + 100 completion tokens at $1/$10 per M.
    let projected = v["cost_usd"]["projected"].as_f64().unwrap();
    assert!((projected - 4.0 * 0.002).abs() < 1e-9, "{projected}");
    assert!((v["cost_usd"]["recorded"].as_f64().unwrap() - 0.008).abs() < 1e-9);
    let skipped = v["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["path"].as_str().unwrap().contains("other"));
    assert_eq!(up.count(), 0, "replay sends nothing");
    for s in ["app-token-0123456789", "ops-token-0123456789", "k1", "k2"] {
        assert!(!out.contains(&format!("\"{s}\"")), "{s}");
    }
    // The table form says the same.
    let (code, text, _) = run_async(
        vec![
            "replay".into(),
            "--config".into(),
            config.display().to_string(),
            "--month".into(),
            "2026-04".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        text.contains("8 requests replayed")
            && text.contains("refused: app: rate_limit_exceeded: 2"),
        "{text}"
    );
}

/// `/v1/messages` is routed among Anthropic clients only: `route` shows
/// them, and `replay` sends a recorded `messages` row to them, never to an
/// OpenAI client that matches the same name (and the reverse).
#[tokio::test]
async fn route_and_replay_know_anthropic_clients() {
    let dir = tempfile::tempdir().unwrap();
    let usage = dir.path().join("usage");
    std::fs::create_dir_all(&usage).unwrap();
    let mut chat = record("2026-04-10T10:00:00.000Z", "app", "claude-x", "old", 10, 10);
    chat.request_id = "req-chat".into();
    let mut messages = chat.clone();
    messages.request_id = "req-messages".into();
    messages.endpoint = "messages".into();
    let mut f =
        gptbalance::usage::store::UsageFile::open(&usage.join("usage-2026-04.sqlite")).unwrap();
    f.insert_batch(&[&chat, &messages, &messages]).unwrap();
    drop(f);
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        "usage:\n  dir: ./usage\nopenai_clients:\n  - { name: oa, base_url: \"http://127.0.0.1:9/v1\", api_key: k1, model_match: { type: keyword, value: [claude] } }\n  - { name: an, api: anthropic, base_url: \"http://127.0.0.1:9/v1\", api_key: k2, model_match: { type: exact, value: [claude-x] }, fallback: [claude-y] }\n  - { name: an2, api: anthropic, base_url: \"http://127.0.0.1:9/v1\", api_key: k3, model_match: { type: exact, value: [claude-y] } }\n",
    )
    .unwrap();
    let c = config.display().to_string();
    let (code, out, err) = run_async(
        vec![
            "route".into(),
            "--config".into(),
            c.clone(),
            "claude-x".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let anthropic = out
        .find("model `claude-x` on /v1/messages (Anthropic clients)")
        .unwrap_or_else(|| panic!("{out}"));
    let (openai_part, anthropic_part) = out.split_at(anthropic);
    assert!(openai_part.contains("oa — weight"), "{out}");
    assert!(!openai_part.contains("an — weight"), "{out}");
    assert!(anthropic_part.contains("an — weight"), "{out}");
    assert!(!anthropic_part.contains("oa — weight"), "{out}");
    assert!(
        anthropic_part.contains("-> claude-y (depth 1): an2"),
        "{out}"
    );

    // A name only Anthropic clients serve is still explained.
    let (code, out, _) = run_async(
        vec![
            "route".into(),
            "--config".into(),
            c.clone(),
            "claude-y".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("an2 — weight"), "{out}");

    let (code, out, err) = run_async(
        vec![
            "replay".into(),
            "--config".into(),
            c,
            "--month".into(),
            "2026-04".into(),
            "--format".into(),
            "json".into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"], 3, "{v}");
    assert_eq!(v["after"]["clients"]["oa"], 1, "{v}");
    assert_eq!(v["after"]["clients"]["an"], 2, "{v}");
}

/// Shadow: matching non-stream requests are mirrored after the caller's
/// response, never delaying it (the shadow client here hangs), counted
/// against no caller limit, stopped for the day by `max_usd_per_day`, and
/// compared with their originals by `usage --shadow`.
#[tokio::test]
async fn shadow_mirrors_after_the_response_and_never_delays_it() {
    let main = MockUpstream::start("main").await;
    let hanging = MockUpstream::start("hanging").await;
    hanging.set_default(Reply::Hang);
    let mirror = MockUpstream::start("mirror").await;
    let yaml = |shadow_url: &str, extra: &str| {
        format!(
            "usage:\n  dir: ./usage\nprices:\n  \"*\": {{ input: 1000, output: 1000 }}\ncallers:\n  - {{ name: app, token: app-token-0123456789, limits: {{ rpm: 3 }} }}\nshadow:\n  - {{ client: candidate, percent: 100, models: [\"m*\"]{extra} }}\nopenai_clients:\n{}{}",
            client_yaml("main", &main.url(), &["k1"], "model_match: { type: exact, value: [m, other] }"),
            client_yaml("candidate", shadow_url, &["k2"], "priority: 500\nmodel_match: { type: exact, value: [candidate-only] }"),
        )
    };
    let auth = [("authorization", "Bearer app-token-0123456789")];
    // A hanging shadow client: the caller's answers come all the same.
    let gw = Gateway::start(&yaml(&hanging.url(), "")).await;
    for _ in 0..3 {
        let r = post_with(&gw.url("/v1/chat/completions"), chat("m"), &auth).await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("hello from main"));
    }
    assert!(
        eventually(std::time::Duration::from_secs(3), || hanging.count() == 3).await,
        "each request was mirrored after its answer"
    );
    // Mirrors count against no caller limit: rpm 3 spent by the 3 originals.
    let r = post_with(&gw.url("/v1/chat/completions"), chat("m"), &auth).await;
    assert_eq!(r.status, 429);
    // Streams and other models are not mirrored.
    gw.stop().await;
    assert_eq!(hanging.count(), 3);

    // A working shadow client: rows paired by request id, capped per day.
    // One mirror of this request costs 18 tokens at $1000/M = $0.018.
    let gw = Gateway::start(&yaml(&mirror.url(), ", max_usd_per_day: 0.03")).await;
    for model in ["m", "m", "m"] {
        let r = post_with(&gw.url("/v1/chat/completions"), chat(model), &auth).await;
        assert_eq!(r.status, 200);
    }
    assert!(eventually(std::time::Duration::from_secs(3), || mirror.count() >= 2).await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // $0.018 + $0.018 > $0.03: the third is not mirrored.
    assert_eq!(mirror.count(), 2);
    let metrics = get(&gw.url("/metrics"), &auth).await.text();
    assert!(
        metrics
            .contains("gptbalance_shadow_requests_total{client=\"candidate\",result=\"sent\"} 2"),
        "{metrics}"
    );
    let dir = gw.stop().await;
    let db = rusqlite::Connection::open(dir.path().join("usage").join(format!(
        "usage-{}.sqlite",
        &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7]
    )))
    .unwrap();
    let paired: i64 = db
        .query_row(
            "SELECT count(*) FROM requests s JOIN requests o ON o.request_id = s.request_id AND o.shadow = 0 WHERE s.shadow = 1 AND s.client = 'candidate' AND o.client = 'main'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(paired, 2);
    std::fs::write(dir.path().join("config.yaml"), yaml(&mirror.url(), "")).unwrap();
    let (code, out, err) = run(
        &[
            "usage",
            "--config",
            dir.path().join("config.yaml").to_str().unwrap(),
            "--shadow",
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["client"], "main");
    assert_eq!(v[0]["shadow_client"], "candidate");
    assert_eq!(v[0]["pairs"], 2);
    assert_eq!(v[0]["same_status"], 2);
    assert_eq!(v[0]["shadow_tokens"], 36);
}
