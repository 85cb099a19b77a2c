//! The status page and what feeds it: `/admin/ui` in a real browser,
//! `/admin/usage`, and the background probes of keys refused with 401/403.

use crate::common;

use std::time::Duration;

use common::*;
use gptbalance::proxy::endpoints::status_json;
use serde_json::{json, Value};

fn admin() -> [(&'static str, &'static str); 1] {
    [("authorization", "Bearer adm")]
}

fn key_status<'a>(status: &'a Value, client: &str) -> &'a Value {
    status["clients"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == client))
        .map(|c| &c["keys"][0])
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_refused_key_comes_back_by_probe_without_a_caller_failing_on_it() {
    let (a, b) = (
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
    );
    let gw = Gateway::start(&format!(
        "usage:\n  enabled: false\nserver:\n  admin_token: adm\nrouting:\n  cooldown: 300ms\nopenai_clients:\n{}{}",
        client_yaml("a", &a.url(), &["sk-SECRET-a"], "priority: 1\nmodel_match: { type: exact, value: [m] }"),
        client_yaml("b", &b.url(), &["sk-SECRET-b"], "priority: 2\nmodel_match: { type: exact, value: [m] }"),
    ))
    .await;
    // The caller's request is refused, then the first probe too; the key
    // is fixed in the provider's console before the second probe.
    let refused = json!({"error": {"message": "Incorrect API key"}});
    a.push(Reply::Json(401, refused.clone()));
    a.push(Reply::Json(401, refused));
    a.set_default(Reply::Json(200, json!({"object": "list", "data": []})));

    let mut answered = 0;
    let back = eventually(Duration::from_secs(10), || {
        let status = key_status(&status_json(&gw.state), "a").clone();
        status["healthy"] == true && status["probes"] == 2
    });
    tokio::pin!(back);
    let came_back = loop {
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200, "a caller's request failed: {}", r.text());
        answered += 1;
        tokio::select! {
            ok = &mut back => break ok,
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
    };
    assert!(
        came_back,
        "key a did not come back: {}",
        status_json(&gw.state)
    );
    assert!(answered > 2, "callers kept asking while key a was out");

    // Key a saw one caller request (the 401), then the two probes with its
    // key, and callers only after the probe that succeeded.
    let seen = a.requests();
    assert_eq!(seen[0].method, "POST");
    assert!(seen.len() >= 3, "{seen:?}");
    for probe in &seen[1..3] {
        assert_eq!(
            (probe.method.as_str(), probe.uri.as_str()),
            ("GET", "/v1/models")
        );
        assert_eq!(probe.auth(), "Bearer sk-SECRET-a");
    }
    // Back in rotation: the next request goes to a and succeeds.
    a.set_default(Reply::Ok);
    assert!(gw.chat("m").await.text().contains("hello from a"));

    let status = get(&gw.url("/admin/status"), &admin()).await.json();
    let k = key_status(&status, "a");
    assert_eq!(
        (k["last_probe"].as_str(), k["awaiting_probe"].as_bool()),
        (Some("ok"), Some(false))
    );
    let metrics = get(&gw.url("/metrics"), &[]).await.text();
    for line in [
        "gptbalance_key_probes_total{client=\"a\",result=\"invalid\"} 1",
        "gptbalance_key_probes_total{client=\"a\",result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert!(!metrics.contains("sk-SECRET-a"));
}

#[tokio::test]
async fn without_probing_a_refused_key_returns_when_its_cooldown_ends() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "usage:\n  enabled: false\nrouting:\n  cooldown: 200ms\n  probe_keys: false\nopenai_clients:\n{}",
        one_client(&up, ""),
    ))
    .await;
    up.push(Reply::Json(401, json!({"error": {"message": "bad key"}})));
    assert_ne!(gw.chat("m").await.status, 200);
    let back = eventually(Duration::from_secs(5), || {
        gw.state.table.load().clients[0].keys[0]
            .health
            .is_available()
    })
    .await;
    assert!(back);
    assert_eq!(gw.chat("m").await.status, 200);
    assert!(
        up.requests().iter().all(|r| r.method == "POST"),
        "no probe expected"
    );
}

/// A gateway with usage on, two clients (three keys), a named caller and
/// an admin token; none of the secrets may reach the page.
async fn gateway_with_traffic(
    a: &MockUpstream,
    b: &MockUpstream,
    usage: &std::path::Path,
) -> Gateway {
    let gw = Gateway::start(&format!(
        "usage:\n  dir: \"{}\"\nserver:\n  admin_token: adm-SECRET-token\n  auth_tokens:\n    - {{ name: team-alpha, token: tok-SECRET-alpha }}\nopenai_clients:\n{}{}",
        usage.display(),
        client_yaml("primary-east", &a.url(), &["sk-SECRET-1", "sk-SECRET-2"], "model_match: { type: exact, value: [m] }"),
        client_yaml("backup-west", &b.url(), &["sk-SECRET-3"], "model_match: { type: exact, value: [n] }"),
    ))
    .await;
    let caller = [("authorization", "Bearer tok-SECRET-alpha")];
    for model in ["m", "m", "n", "m"] {
        let r = post_with(&gw.url("/v1/chat/completions"), chat(model), &caller).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("unknown-model"),
        &caller,
    )
    .await;
    assert_eq!(r.status, 404);
    gw
}

fn admin_token() -> [(&'static str, &'static str); 1] {
    [("authorization", "Bearer adm-SECRET-token")]
}

/// Waits until the usage writer has flushed `n` rows for this month.
async fn wait_rows(gw: &Gateway, n: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let u = get(&gw.url("/admin/usage"), &admin_token()).await.json();
        if u["total"]["requests"] == n || tokio::time::Instant::now() > deadline {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_usage_adds_a_per_day_series_and_the_latest_errors_to_the_report() {
    let (a, b) = (
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
    );
    let usage = tempfile::tempdir().unwrap();
    let gw = gateway_with_traffic(&a, &b, usage.path()).await;
    let u = wait_rows(&gw, 5).await;
    assert_eq!(u["total"]["requests"], 5, "{u}");
    assert_eq!(u["by"], "client");
    let days = u["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{u}");
    assert_eq!(days[0]["requests"], 5);
    assert_eq!(days[0]["errors"], 1);
    assert_eq!(days[0]["total_tokens"], u["total"]["total_tokens"]);
    assert_eq!(days[0]["cost_usd"], 0.0);
    let groups: Vec<_> = u["days_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["group"].as_str().unwrap(),
                d["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [("(none)", 1), ("backup-west", 1), ("primary-east", 3)]
    );
    let errors = u["latest_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0]["status"].as_u64(), errors[0]["model"].as_str()),
        (Some(404), Some("unknown-model"))
    );

    let r = get(&gw.url("/admin/usage?by=caller"), &admin_token()).await;
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.json()["days_by"][0]["group"], "team-alpha");
    assert_eq!(r.json()["groups"][0]["group"], "team-alpha");

    // A month without a file: an empty report and a note, not an error.
    let r = get(&gw.url("/admin/usage?month=2001-01"), &admin_token()).await;
    assert_eq!(r.status, 200);
    let empty = r.json();
    assert_eq!(
        (
            empty["days"].as_array().map(Vec::len),
            empty["total"]["requests"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert!(
        empty["note"]
            .as_str()
            .unwrap()
            .contains("no usage file for 2001-01"),
        "{empty}"
    );

    // A foreign file in its place is said, and left untouched.
    let foreign = usage.path().join("usage-2001-02.sqlite");
    std::fs::write(&foreign, "not a database").unwrap();
    let r = get(&gw.url("/admin/usage?month=2001-02"), &admin_token()).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["unavailable"]
            .as_str()
            .unwrap()
            .contains("not a gptbalance usage database"),
        "{}",
        r.text()
    );
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not a database");

    for (query, status) in [("?month=2026-13", 400), ("?by=colour", 400)] {
        let r = get(&gw.url(&format!("/admin/usage{query}")), &admin_token()).await;
        assert_eq!(r.status, status, "{query}: {}", r.text());
    }
    assert_eq!(get(&gw.url("/admin/usage"), &[]).await.status, 401);
    assert_eq!(
        get(
            &gw.url("/admin/usage"),
            &[("authorization", "Bearer wrong")]
        )
        .await
        .status,
        401
    );
    let status = get(&gw.url("/admin/status"), &admin_token()).await;
    assert_eq!(status.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn the_page_is_served_without_the_token_under_a_same_origin_policy() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "usage:\n  enabled: false\nserver:\n  admin_token: adm\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    for (path, kind) in [
        ("/admin/ui", "text/html"),
        ("/admin/ui/app.js", "text/javascript"),
        ("/admin/ui/style.css", "text/css"),
    ] {
        let r = get(&gw.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        assert_eq!(r.headers["content-security-policy"], "default-src 'self'");
        assert_eq!(r.headers["cache-control"], "no-store");
    }
    assert_eq!(get(&gw.url("/admin/ui/nope.js"), &[]).await.status, 404);
    let u = get(&gw.url("/admin/usage"), &admin()).await.json();
    assert_eq!(u["note"], "usage recording is off (usage.enabled: false)");
    // Without an admin token configured there is no page either.
    let off = Gateway::start(&format!(
        "usage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    assert_eq!(get(&off.url("/admin/ui"), &[]).await.status, 404);
}

/// `chromium --headless --dump-dom` of `url`: the DOM after the page's
/// scripts ran for five seconds of virtual time. Fails on a script error
/// or anything the Content-Security-Policy refused (from the console).
async fn browser_dom(url: String) -> String {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        panic!(
            "the status page test needs a headless Chromium: install the `chromium` package \
             (apt-get install -y chromium; .ci/run does), or set GPTBALANCE_SKIP_BROWSER=1 to skip it"
        );
    };
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let console = tempfile::NamedTempFile::new().unwrap();
        let mut child = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .stdout(out.reopen().unwrap())
            .stderr(console.reopen().unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 90 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let console = std::fs::read_to_string(console.path()).unwrap_or_default();
        for line in console.lines().filter(|l| l.contains("CONSOLE")) {
            assert!(
                !line.contains("Content Security Policy") && !line.contains("Uncaught"),
                "the page failed in the browser: {line}"
            );
        }
        std::fs::read_to_string(out.path()).unwrap()
    })
    .await
    .unwrap()
}

fn skip_browser() -> bool {
    let skip = std::env::var_os("GPTBALANCE_SKIP_BROWSER").is_some_and(|v| v == "1");
    if skip {
        eprintln!("skipped: GPTBALANCE_SKIP_BROWSER=1");
    }
    skip
}

#[tokio::test]
async fn the_status_page_in_a_real_browser_shows_clients_keys_and_a_chart_and_no_secret() {
    if skip_browser() {
        return;
    }
    let (a, b) = (
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
    );
    let usage = tempfile::tempdir().unwrap();
    let gw = gateway_with_traffic(&a, &b, usage.path()).await;
    assert_eq!(wait_rows(&gw, 5).await["total"]["requests"], 5);
    let status = get(&gw.url("/admin/status"), &admin_token()).await.json();

    let dom = browser_dom(gw.url("/admin/ui#token=adm-SECRET-token")).await;
    assert!(
        dom.contains("<table id=\"keys\""),
        "the page did not load:\n{dom}"
    );
    for client in status["clients"].as_array().unwrap() {
        let name = client["name"].as_str().unwrap();
        assert!(
            dom.contains(&format!("<td>{name}</td>")),
            "client {name} missing:\n{dom}"
        );
        for key in client["keys"].as_array().unwrap() {
            let id = key["id"].as_str().unwrap();
            assert!(dom.contains(id), "key {id} missing:\n{dom}");
        }
    }
    // Callers are listed when the status carries them.
    match status["callers"].as_array() {
        Some(callers) => {
            for c in callers {
                let name = c["name"].as_str().unwrap();
                assert!(
                    dom.contains(&format!("<td>{name}</td>")),
                    "caller {name} missing:\n{dom}"
                );
            }
        }
        None => assert!(
            dom.contains("<section id=\"callers-section\" hidden"),
            "{dom}"
        ),
    }
    // One day of traffic drawn as bars, with a legend of the clients.
    assert!(
        dom.contains("<svg") && dom.contains("data-days=\"1\""),
        "no chart:\n{dom}"
    );
    assert!(
        dom.contains("class=\"bar s0\""),
        "the chart has no bar:\n{dom}"
    );
    assert!(dom.contains("<li class=\"s0\">primary-east</li>"), "{dom}");
    assert!(
        dom.contains("unknown-model"),
        "the latest error is missing:\n{dom}"
    );
    assert!(
        !dom.contains("SECRET"),
        "a key or token reached the page:\n{dom}"
    );

    // A wrong token: a clear message and the form, never a blank page.
    let dom = browser_dom(gw.url("/admin/ui#token=wrong")).await;
    assert!(dom.contains("The admin token was refused"), "{dom}");
    assert!(
        dom.contains("<form id=\"login\">"),
        "the form is not shown:\n{dom}"
    );
    // No token at all: the form asks for it.
    let dom = browser_dom(gw.url("/admin/ui")).await;
    assert!(dom.contains("Enter the admin token"), "{dom}");
}

/// Not a check: the time of `/admin/usage` on a month of a million rows,
/// for `bench/README.md`. Run with
/// `cargo test --release --test status_page -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_admin_usage_on_a_million_row_month() {
    use gptbalance::usage::report::GroupBy;
    use gptbalance::usage::store::{self, UsageFile};
    use gptbalance::usage::UsageRecord;
    use std::sync::Arc;
    use std::time::{Instant, SystemTime};

    const ROWS: u64 = 1_000_000;
    let usage = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let month = store::month_of(now);
    let path = store::path_for(usage.path(), &month);
    // Rows spread over 30 days from the start of this month (UTC), three
    // clients, four models, one error in fifty.
    let day: u64 = humantime::format_rfc3339_seconds(now).to_string()[8..10]
        .parse()
        .unwrap();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start =
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400 - (day - 1) * 86_400);
    let span: u64 = 30 * 86_400_000;
    let (clients, models) = (
        ["east", "west", "backup"].map(Arc::<str>::from),
        ["gpt-4o", "gpt-4o-mini", "o3", "embed"].map(Arc::<str>::from),
    );
    let started = Instant::now();
    let mut f = UsageFile::open(&path).unwrap();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..ROWS {
        let status = if i % 50 == 0 { 502 } else { 200 };
        batch.push(UsageRecord {
            ts: Some(start + Duration::from_millis(i * span / ROWS)),
            request_id: format!("req_{i:016x}"),
            endpoint: "chat/completions".into(),
            model: Some(models[(i % 4) as usize].clone()),
            client: Some(clients[(i % 3) as usize].clone()),
            key_id: Some(Arc::from("key-0123abcd")),
            status,
            attempts: 1,
            latency_ms: 100 + i % 900,
            prompt_tokens: Some(50),
            completion_tokens: Some(20),
            total_tokens: Some(70),
            error: (status >= 400).then(|| "upstream answered 502".to_owned()),
            ..UsageRecord::default()
        });
        if batch.len() == 10_000 {
            f.insert_batch(&batch.iter().collect::<Vec<_>>()).unwrap();
            batch.clear();
        }
    }
    drop(f);
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "wrote {ROWS} rows ({} MB) in {:?}",
        size / 1_000_000,
        started.elapsed()
    );

    for _ in 0..2 {
        let t = Instant::now();
        gptbalance::usage::report::build(&[&path], &month, GroupBy::Client, None).unwrap();
        let totals = t.elapsed();
        let t = Instant::now();
        gptbalance::usage::daily::build(&[&path], GroupBy::Client).unwrap();
        println!("report::build {totals:?}, daily::build {:?}", t.elapsed());
    }
    let gw = Gateway::start(&format!(
        "usage:\n  dir: \"{}\"\nserver:\n  admin_token: adm\nopenai_clients:\n{}",
        usage.path().display(),
        client_yaml(
            "east",
            "http://127.0.0.1:9/v1",
            &["k"],
            "model_match: { type: exact, value: [m] }"
        ),
    ))
    .await;
    for by in ["client", "model", "client", "model"] {
        let t = Instant::now();
        let r = get(&gw.url(&format!("/admin/usage?by={by}")), &admin()).await;
        let took = t.elapsed();
        let u = r.json();
        assert_eq!(u["total"]["requests"], ROWS, "{}", r.text());
        println!(
            "GET /admin/usage?by={by}: {took:?} ({} days, {} bytes)",
            u["days"].as_array().unwrap().len(),
            r.body.len()
        );
    }
}

/// Serves the page's own files and fixed `/admin/status` and
/// `/admin/usage` answers carrying what later builds add (callers with a
/// budget, a quota reading, a key waiting for its probe, costs), so the
/// page is shown to draw them before any gateway sends them.
async fn fake_admin(status: Value, usage: Value) -> std::net::SocketAddr {
    use gptbalance::proxy::admin_ui;
    use gptbalance::proxy::body::ResponseBody;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (status, usage) = (status.clone(), usage.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let path = req.uri().path().trim_start_matches("/admin/").to_owned();
                    let authorized = req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer adm");
                    let resp = match (path.as_str(), authorized) {
                        ("status", true) => admin_ui::json_ok(&status),
                        ("usage", true) => admin_ui::json_ok(&usage),
                        ("status" | "usage", false) => {
                            let mut r = http::Response::new(ResponseBody::full("{}"));
                            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                            r
                        }
                        (what, _) => admin_ui::asset(what).unwrap_or_else(|| {
                            let mut r = http::Response::new(ResponseBody::full(""));
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                            r
                        }),
                    };
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_page_draws_callers_budgets_quotas_probes_and_a_missing_usage_file() {
    if skip_browser() {
        return;
    }
    let status = json!({
        "generation": 7,
        "last_reload": {"ok": false, "at": "2026-12-03T08:00:00.000Z", "errors": ["config.yaml:4:3: unknown field `cooldwn`"]},
        "clients": [{"name": "east", "keys": [
            {"id": "key-00000001", "healthy": true, "cooldown_until": null, "requests": 10, "failures": 0,
             "quota": {"remaining_requests": 4999, "remaining_tokens": 880000}},
            {"id": "key-00000002", "healthy": false, "cooldown_until": "2026-12-03T08:05:00.000Z", "requests": 3,
             "failures": 1, "awaiting_probe": true, "probes": 2, "last_probe": "invalid"}
        ]}],
        "callers": [
            {"name": "team-alpha", "in_flight": 2, "rpm_used": 30, "tpm_used": 9000, "spent_usd": 1.5,
             "spent_tokens": 120000, "reserved_usd": 0.02, "period": "month",
             "limits": {"rpm": 60, "tpm": null, "concurrency": 4, "budget_usd": 10.0, "budget_tokens": null}},
            {"name": "batch-jobs", "in_flight": 0, "rpm_used": 0, "tpm_used": 0, "spent_usd": 0.25,
             "spent_tokens": 900, "reserved_usd": 0.0, "period": "day",
             "limits": {"rpm": null, "tpm": null, "concurrency": null, "budget_usd": null, "budget_tokens": 5000}}
        ]
    });
    let usage = json!({
        "month": "2026-12", "by": "client", "files": [], "groups": [],
        "total": {"group": "TOTAL", "requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                  "total_tokens": 0, "latency_p50_ms": 0, "latency_p95_ms": 0, "latency_p99_ms": 0},
        "days": [], "days_by": [], "latest_errors": [],
        "unavailable": "/var/lib/gptbalance/usage-2026-12.sqlite is not a gptbalance usage database; it was left untouched"
    });
    let addr = fake_admin(status, usage).await;
    let dom = browser_dom(format!("http://{addr}/admin/ui#token=adm")).await;
    assert!(
        dom.contains("<td>team-alpha</td>") && dom.contains("<td>batch-jobs</td>"),
        "callers missing:\n{dom}"
    );
    assert!(
        !dom.contains("<section id=\"callers-section\" hidden"),
        "{dom}"
    );
    assert!(
        dom.contains("$1.50 of $10.00"),
        "spend against budget missing:\n{dom}"
    );
    assert!(
        dom.contains("remaining_requests 4999"),
        "quota reading missing:\n{dom}"
    );
    assert!(
        dom.contains("refused, probing") && dom.contains("2 (last invalid)"),
        "probe state missing:\n{dom}"
    );
    assert!(
        dom.contains("unknown field `cooldwn`"),
        "reload error missing:\n{dom}"
    );
    assert!(dom.contains("Usage cannot be read: /var/lib/gptbalance/usage-2026-12.sqlite is not a gptbalance usage database"), "{dom}");
    assert!(
        dom.contains("No requests recorded in 2026-12 yet"),
        "the empty month is not said:\n{dom}"
    );
    // The key table still works beside the usage problem, worst health first.
    let probing = dom.find("key-00000002").unwrap();
    assert!(
        probing < dom.find("key-00000001").unwrap(),
        "not sorted by health:\n{dom}"
    );
}
