//! Live operations: hot reload, the usage store, metrics, admin API.
//! Real files on disk, real SQLite files, the real server on loopback.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;

fn cfg(clients: &[String], top: &str) -> String {
    format!("{top}openai_clients:\n{}", clients.concat())
}

const NO_USAGE: &str = "usage:\n  enabled: false\nserver:\n  admin_token: adm\n";

fn admin() -> [(&'static str, &'static str); 1] {
    [("authorization", "Bearer adm")]
}

/// Writes `text` as editors do: to a temp file, then rename over the original.
fn rename_save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn edits_in_place_and_rename_saves_are_applied_within_two_seconds() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let to = |url: &str| {
        cfg(
            &[client_yaml(
                "c",
                url,
                &["k"],
                "model_match: { type: exact, value: [m] }",
            )],
            NO_USAGE,
        )
    };
    let gw = Gateway::start(&to(&a.url())).await;
    assert_eq!(gw.generation(), 1);
    assert_eq!(
        gw.chat("m").await.json()["choices"][0]["message"]["content"],
        "hello from a"
    );

    std::fs::write(gw.config_path(), to(&b.url())).unwrap();
    assert!(gw.wait_generation(2).await, "in-place edit applied");
    assert_eq!(
        gw.chat("m").await.json()["choices"][0]["message"]["content"],
        "hello from b"
    );

    rename_save(&gw.config_path(), &to(&a.url()));
    assert!(gw.wait_generation(3).await, "rename-save applied");
    assert_eq!(
        gw.chat("m").await.json()["choices"][0]["message"]["content"],
        "hello from a"
    );

    let status = get(&gw.url("/admin/status"), &admin()).await.json();
    assert_eq!(status["generation"], 3);
    assert_eq!(status["last_reload"]["ok"], true);
}

#[tokio::test]
async fn a_symlink_flip_like_a_kubernetes_configmap_is_applied() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let to = |url: &str| {
        cfg(
            &[client_yaml(
                "c",
                url,
                &["k"],
                "model_match: { type: exact, value: [m] }",
            )],
            NO_USAGE,
        )
    };
    let gw = Gateway::start(&to(&a.url())).await;
    let dir = gw.dir.path();
    // ..data -> ..v1/ ; config.yaml -> ..data/config.yaml
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/config.yaml"), to(&a.url())).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::fs::remove_file(gw.config_path()).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", gw.config_path()).unwrap();
    assert!(gw.wait_generation(2).await);
    let g = gw.generation();

    std::fs::create_dir(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/config.yaml"), to(&b.url())).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert!(gw.wait_generation(g + 1).await, "symlink flip applied");
    assert_eq!(
        gw.chat("m").await.json()["choices"][0]["message"]["content"],
        "hello from b"
    );
}

#[tokio::test]
async fn an_invalid_file_keeps_the_running_table_and_shows_its_errors() {
    let up = MockUpstream::start("up").await;
    let good = cfg(&[one_client(&up, "")], NO_USAGE);
    let gw = Gateway::start(&good).await;
    std::fs::write(
        gw.config_path(),
        good.replace("model_match:", "model_mach:"),
    )
    .unwrap();
    let mut status = serde_json::Value::Null;
    let mut seen = false;
    for _ in 0..100 {
        status = get(&gw.url("/admin/status"), &admin()).await.json();
        if status["last_reload"]["ok"] == false {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "the failed reload shows in /admin/status: {status}");
    assert_eq!(status["generation"], 1);
    let err = status["last_reload"]["errors"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let path = gw.config_path().display().to_string();
    assert!(
        err.starts_with(&format!("{path}:9:5: unknown key `model_mach`")),
        "{err}"
    );
    assert_eq!(
        gw.chat("m").await.status,
        200,
        "still serving the old table"
    );
    let metrics = get(&gw.url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("gptbalance_reloads_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("gptbalance_reloads_total{result=\"ok\"}"),
        "the first load is not a reload"
    );

    // A half-written file, then the file deleted: the table stays.
    std::fs::write(gw.config_path(), &good[..good.len() / 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::remove_file(gw.config_path()).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gw.generation(), 1);
    assert_eq!(gw.chat("m").await.status, 200);

    // Writing it back applies it.
    std::fs::write(gw.config_path(), &good).unwrap();
    assert!(gw.wait_generation(2).await);
}

#[tokio::test]
async fn admin_reload_and_key_health_carry_over() {
    let up = MockUpstream::start("up").await;
    let text = |extra: &str| {
        cfg(
            &[client_yaml(
                "c",
                &up.url(),
                &["k1", "k2"],
                &format!("{extra}model_match: {{ type: exact, value: [m] }}"),
            )],
            NO_USAGE,
        )
    };
    let gw = Gateway::start(&text("")).await;
    up.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "600".into())],
        "{}".into(),
    ));
    assert_eq!(gw.chat("m").await.status, 200);
    let limited = up.requests()[0].auth();

    // The file changes (weight) but both keys remain: the cooldown survives.
    std::fs::write(gw.config_path(), text("weight: 2\n")).unwrap();
    let r = send(
        http::Request::post(gw.url("/admin/reload"))
            .header("authorization", "Bearer adm")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["generation"].as_u64().unwrap() >= 2);
    let keys = r.json()["clients"][0]["keys"].clone();
    assert_eq!(
        keys.as_array()
            .unwrap()
            .iter()
            .filter(|k| k["healthy"] == false)
            .count(),
        1,
        "{keys}"
    );
    for _ in 0..4 {
        gw.chat("m").await;
    }
    assert!(up.requests()[2..].iter().all(|r| r.auth() != limited));

    // Admin auth: wrong token 401, no admin token configured 404.
    assert_eq!(
        get(
            &gw.url("/admin/status"),
            &[("authorization", "Bearer nope")]
        )
        .await
        .status,
        401
    );
    let no_admin = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  enabled: false\n")).await;
    assert_eq!(
        get(&no_admin.url("/admin/status"), &admin()).await.status,
        404
    );
}

#[tokio::test]
async fn requests_in_flight_finish_on_the_table_they_started_with() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    a.push(Reply::Delay(Duration::from_millis(800)));
    let to = |url: &str| {
        cfg(
            &[client_yaml(
                "c",
                url,
                &["k"],
                "model_match: { type: exact, value: [m] }",
            )],
            NO_USAGE,
        )
    };
    let gw = Gateway::start(&to(&a.url())).await;
    let url = gw.url("/v1/chat/completions");
    let slow = tokio::spawn(async move { post(&url, chat("m")).await });
    assert!(eventually(Duration::from_secs(2), || a.count() == 1).await);
    std::fs::write(gw.config_path(), to(&b.url())).unwrap();
    assert!(gw.wait_generation(2).await);
    let r = gw.chat("m").await;
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hello from b");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hello from a");
}

#[tokio::test]
async fn a_hundred_reloads_under_load_fail_no_request() {
    let up = MockUpstream::start("up").await;
    up.set_default(Reply::Sse {
        events: vec![
            chat_chunk("a"),
            chat_chunk("b"),
            usage_chunk(1, 2),
            DONE.to_owned(),
        ],
        gate: None,
        abort_at_end: false,
    });
    let text = |w: u32| {
        cfg(
            &[
                client_yaml(
                    "c1",
                    &up.url(),
                    &["k1"],
                    &format!("weight: {w}\nmodel_match: {{ type: exact, value: [m] }}"),
                ),
                client_yaml(
                    "c2",
                    &up.url(),
                    &["k2"],
                    "model_match: { type: exact, value: [m] }",
                ),
            ],
            NO_USAGE,
        )
    };
    let gw = Arc::new(Gateway::start(&text(1)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for i in 0..4 {
        let (gw, stop, done) = (gw.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let streamed = i % 2 == 0;
                let body = json!({"model": "m", "stream": streamed, "messages": []});
                let mut resp = open_stream(&gw.url("/v1/chat/completions"), body).await;
                let status = resp.status();
                let all = read_all(resp.body_mut()).await;
                match (status.as_u16(), all) {
                    (200, Ok(text)) if text.ends_with(DONE) => {}
                    other => failures.push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    for n in 0..100u32 {
        if n % 2 == 0 {
            std::fs::write(gw.config_path(), text(1 + n % 5)).unwrap();
        } else {
            rename_save(&gw.config_path(), &text(1 + n % 5));
        }
        // Leave each tenth write time to be seen as its own burst (well
        // past the 250 ms debounce, even on a loaded machine).
        tokio::time::sleep(Duration::from_millis(if n % 10 == 0 { 700 } else { 15 })).await;
    }
    let before = gw.generation();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        done.load(Ordering::Relaxed) > 50,
        "requests ran during the reloads"
    );
    // Ten bursts apart: most become reloads of their own (timers on a
    // loaded machine may merge some), every one applied without a failure.
    assert!(before >= 6, "reloads were applied (generation {before})");
    let status = get(&gw.url("/admin/status"), &admin()).await.json();
    assert_eq!(status["last_reload"]["ok"], true);
}

/// One row of the `requests` table, read by column name.
struct Row {
    request_id: String,
    ts: String,
    caller: Option<String>,
    endpoint: String,
    model: Option<String>,
    routed_model: Option<String>,
    client: Option<String>,
    key_id: Option<String>,
    status: i64,
    stream: i64,
    attempts: i64,
    ttft_ms: Option<i64>,
    tokens: (Option<i64>, Option<i64>, Option<i64>),
    error: Option<String>,
}

fn open_db(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

#[tokio::test]
async fn usage_rows_record_every_request_with_tokens_for_streams_too() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[client_yaml(
            "c",
            &up.url(),
            &["sk-usage-secret"],
            "upstream_model: up-m\nmodel_match: { type: exact, value: [m] }",
        )],
        "server:\n  auth_tokens:\n    - { name: batch, token: tok-1 }\nusage:\n  dir: ./usage\n",
    ))
    .await;
    let auth = [("authorization", "Bearer tok-1")];
    let r = post_with(&gw.url("/v1/chat/completions"), chat("m"), &auth).await;
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    up.push(Reply::Sse {
        events: vec![chat_chunk("x"), usage_chunk(5, 6), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let mut resp = client()
        .request(post_req(
            &gw.url("/v1/chat/completions"),
            json!({"model": "m", "stream": true, "messages": []}).to_string(),
            &auth,
        ))
        .await
        .unwrap();
    let text = read_all(resp.body_mut()).await.unwrap();
    assert!(
        !text.contains("usage"),
        "the usage chunk gptbalance asked for is removed"
    );
    post_with(&gw.url("/v1/chat/completions"), chat("unknown"), &auth).await;

    let dir = gw.stop().await;
    let month = humantime::format_rfc3339(SystemTime::now()).to_string()[..7].to_owned();
    let db = open_db(&dir.path().join(format!("usage/usage-{month}.sqlite")));
    let rows: Vec<Row> = db
        .prepare("SELECT * FROM requests ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok(Row {
                request_id: r.get("request_id")?,
                ts: r.get("ts")?,
                caller: r.get("caller")?,
                endpoint: r.get("endpoint")?,
                model: r.get("model")?,
                routed_model: r.get("routed_model")?,
                client: r.get("client")?,
                key_id: r.get("key_id")?,
                status: r.get("status")?,
                stream: r.get("stream")?,
                attempts: r.get("attempts")?,
                ttft_ms: r.get("ttft_ms")?,
                tokens: (
                    r.get("prompt_tokens")?,
                    r.get("completion_tokens")?,
                    r.get("total_tokens")?,
                ),
                error: r.get("error")?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3);
    let first = &rows[0];
    assert_eq!(first.request_id, rid);
    assert!(
        first.ts.ends_with('Z') && first.ts.len() == 24,
        "RFC 3339 UTC with milliseconds: {}",
        first.ts
    );
    assert_eq!(first.caller.as_deref(), Some("batch"));
    assert_eq!(first.endpoint, "chat/completions");
    assert_eq!(
        (
            first.model.as_deref(),
            first.routed_model.as_deref(),
            first.client.as_deref()
        ),
        (Some("m"), Some("up-m"), Some("c"))
    );
    assert_eq!((first.status, first.stream, first.attempts), (200, 0, 1));
    assert!(first.ttft_ms.is_some());
    assert_eq!(first.tokens, (Some(11), Some(7), Some(18)));
    let key_id = first.key_id.as_deref().unwrap();
    assert!(key_id.starts_with("key-") && !key_id.contains("secret"));
    let stream = &rows[1];
    assert_eq!(
        (stream.stream, stream.tokens),
        (1, (Some(5), Some(6), Some(11)))
    );
    let missing = &rows[2];
    assert_eq!((missing.status, missing.client.as_deref()), (404, None));
    assert!(missing.error.as_deref().unwrap().contains("unknown"));
}

#[tokio::test]
async fn ttft_and_latency_count_from_the_request_across_failovers() {
    let slow = MockUpstream::start("slow").await;
    slow.set_default(Reply::Hang);
    let fast = MockUpstream::start("fast").await;
    let gw = Gateway::start(&cfg(
        &[
            client_yaml(
                "slow",
                &slow.url(),
                &["k"],
                "priority: 1\nrequest_timeout: 300ms\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "fast",
                &fast.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "usage:\n  dir: ./u\n",
    ))
    .await;
    assert_eq!(gw.chat("m").await.status, 200);
    let dir = gw.stop().await;
    let month = humantime::format_rfc3339(SystemTime::now()).to_string()[..7].to_owned();
    let (client, attempts, ttft, latency): (String, i64, i64, i64) =
        open_db(&dir.path().join(format!("u/usage-{month}.sqlite")))
            .query_row(
                "SELECT client, attempts, ttft_ms, latency_ms FROM requests",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
    assert_eq!((client.as_str(), attempts), ("fast", 2));
    assert!(ttft >= 300, "the timed-out attempt is in ttft_ms: {ttft}");
    assert!(latency >= ttft, "latency {latency} < ttft {ttft}");
}

#[tokio::test]
async fn a_new_month_gets_a_new_file_without_a_restart() {
    let up = MockUpstream::start("up").await;
    let now = Arc::new(std::sync::Mutex::new(
        humantime::parse_rfc3339("2026-01-31T23:59:59.500Z").unwrap(),
    ));
    let n2 = now.clone();
    let clock: gptbalance::state::Clock = Arc::new(move || *n2.lock().unwrap());
    let gw = Gateway::start_with(
        &cfg(&[one_client(&up, "")], "usage:\n  dir: ./u\n"),
        Some(clock),
    )
    .await;
    gw.chat("m").await;
    *now.lock().unwrap() = humantime::parse_rfc3339("2026-02-01T00:00:00.100Z").unwrap();
    gw.chat("m").await;
    gw.chat("m").await;
    let dir = gw.stop().await;
    let count = |m: &str| -> i64 {
        open_db(&dir.path().join(format!("u/usage-{m}.sqlite")))
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count("2026-01"), 1);
    assert_eq!(count("2026-02"), 2);
    let ts: String = open_db(&dir.path().join("u/usage-2026-01.sqlite"))
        .query_row("SELECT ts FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ts, "2026-01-31T23:59:59.500Z");
}

#[tokio::test]
async fn a_foreign_file_is_never_touched_and_its_rows_count_as_dropped() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  dir: ./u\n")).await;
    let month = humantime::format_rfc3339(SystemTime::now()).to_string()[..7].to_owned();
    let foreign = gw.dir.path().join(format!("u/usage-{month}.sqlite"));
    std::fs::write(&foreign, b"important notes, not a database").unwrap();
    assert_eq!(gw.chat("m").await.status, 200, "serving goes on");
    let metrics = gw.state.metrics.clone();
    let table = gw.state.table.load_full();
    assert!(
        eventually(Duration::from_secs(3), || metrics
            .render(&table.scrape())
            .contains("gptbalance_usage_rows_total{result=\"dropped\"} 1"))
        .await
    );
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        b"important notes, not a database"
    );

    // Once the file is moved away, writing resumes by itself.
    std::fs::rename(&foreign, foreign.with_extension("notes")).unwrap();
    assert_eq!(gw.chat("m").await.status, 200);
    let written = "gptbalance_usage_rows_total{result=\"written\"} 1";
    assert!(
        eventually(Duration::from_secs(3), || metrics
            .render(&table.scrape())
            .contains(written))
        .await
    );
    let dir = gw.stop().await;
    let db = open_db(&dir.path().join(format!("u/usage-{month}.sqlite")));
    let n: i64 = db
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn metrics_count_requests_attempts_tokens_and_key_health() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[client_yaml(
            "c",
            &up.url(),
            &["sk-metric-secret", "k2"],
            "model_match: { type: exact, value: [m] }",
        )],
        NO_USAGE,
    ))
    .await;
    up.push(Reply::Json(500, json!({})));
    assert_eq!(gw.chat("m").await.status, 200);
    let text = get(&gw.url("/metrics"), &[]).await.text();
    for needle in [
        "gptbalance_requests_total{client=\"c\",model=\"m\",status=\"200\"} 1",
        "gptbalance_upstream_attempts_total{client=\"c\",result=\"status_retry\"} 1",
        "gptbalance_upstream_attempts_total{client=\"c\",result=\"ok\"} 1",
        "gptbalance_tokens_total{client=\"c\",model=\"m\",kind=\"prompt\"} 11",
        "gptbalance_key_healthy{client=\"c\",key=\"key-",
        "gptbalance_config_generation 1",
        "gptbalance_requests_in_flight 0",
        "gptbalance_build_info{version=\"",
        "gptbalance_ttft_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("sk-metric-secret"));
    // After a reload the client's series go on (handles are per series,
    // not per routing table).
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), format!("# reloaded\n{yaml}")).unwrap();
    assert!(gw.wait_generation(2).await);
    assert_eq!(gw.chat("m").await.status, 200);
    let text = get(&gw.url("/metrics"), &[]).await.text();
    for needle in [
        "gptbalance_upstream_attempts_total{client=\"c\",result=\"ok\"} 2",
        "gptbalance_request_duration_seconds_count{client=\"c\"} 2",
        "gptbalance_requests_total{client=\"c\",model=\"m\",status=\"200\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}
