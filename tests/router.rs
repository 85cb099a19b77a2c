//! The routing rules of the spec (§2) and the HTTP surface (§3), against the
//! real server on loopback and real HTTP mock upstreams.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::Semaphore;

fn config(clients: &[String], extra_top: &str) -> String {
    format!(
        "usage:\n  enabled: false\n{extra_top}openai_clients:\n{}",
        clients.concat()
    )
}

#[tokio::test]
async fn weights_share_traffic_inside_a_priority_tier() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let reserve = MockUpstream::start("reserve").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "a",
                &a.url(),
                &["ka"],
                "weight: 3\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "b",
                &b.url(),
                &["kb"],
                "weight: 1\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "reserve",
                &reserve.url(),
                &["kr"],
                "priority: 500\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "",
    ))
    .await;
    for _ in 0..200 {
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200);
    }
    assert_eq!((a.count(), b.count(), reserve.count()), (150, 50, 0));
}

#[tokio::test]
async fn keys_rotate_and_the_callers_authorization_never_reaches_upstream() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["k1", "k2", "k3"],
            "model_match: { type: keyword, value: [gpt] }",
        )],
        "",
    ))
    .await;
    for _ in 0..9 {
        let r = post_with(
            &gw.url("/v1/chat/completions?trace=1"),
            chat("gpt-4o"),
            &[
                ("authorization", "Bearer caller-secret"),
                ("x-custom", "kept"),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.headers.contains_key("x-request-id"));
    }
    let reqs = up.requests();
    for k in ["k1", "k2", "k3"] {
        let n = reqs
            .iter()
            .filter(|r| r.auth() == format!("Bearer {k}"))
            .count();
        assert_eq!(n, 3, "key {k} used 3 times of 9");
    }
    assert!(reqs.iter().all(|r| r.uri == "/v1/chat/completions?trace=1"));
    assert!(reqs.iter().all(|r| r.headers["x-custom"] == "kept"));
    assert!(reqs.iter().all(|r| !r.auth().contains("caller-secret")));
}

#[tokio::test]
async fn upstream_gets_the_callers_headers_minus_hop_by_hop_and_credentials() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["k1"],
            "headers: { api-key: from-config, x-replaced: from-config }\nmodel_match: { type: exact, value: [m] }",
        )],
        "",
    ))
    .await;
    let body = r#"{"model":"m","messages":[]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.example\r\nContent-Length: {}\r\n\
         Authorization: Bearer caller-secret\r\nX-Api-Key: caller-key\r\nApi-Key: caller-key\r\n\
         Connection: x-hop, close\r\nX-Hop: dropped\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Accept-Encoding: gzip, br\r\nX-Replaced: from-caller\r\nX-Two: a\r\nX-Kept: yes\r\nX-Two: b\r\n\
         \r\n{body}",
        body.len()
    );
    let answer = raw_exchange(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let h = &reqs[0].headers;
    let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    // hyper's server adds nothing the gateway did not send, so this is
    // the whole set.
    assert_eq!(
        names,
        [
            "accept-encoding",
            "api-key",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "x-kept",
            "x-replaced",
            "x-two"
        ]
    );
    assert_eq!(h["authorization"], "Bearer k1");
    assert_eq!(h["api-key"], "from-config");
    assert_eq!(h["x-replaced"], "from-config");
    assert_eq!(h.get_all("x-replaced").iter().count(), 1);
    assert_eq!(h["accept-encoding"], "identity");
    // No Content-Type from the caller: a POST gets JSON's.
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["host"], up.url().split('/').nth(2).unwrap());
    assert_eq!(h["content-length"], body.len().to_string());
    let two: Vec<_> = h.get_all("x-two").iter().collect();
    assert_eq!(two, ["a", "b"]);
    assert_eq!(h["x-kept"], "yes");
}

#[tokio::test]
async fn rate_limited_key_cools_down_for_its_retry_after_and_503_says_when() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["k1", "k2"],
            "key_strategy: round_robin\nmodel_match: { type: exact, value: [m] }",
        )],
        "server:\n  admin_token: adm\n",
    ))
    .await;
    up.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "30".into())],
        "{}".into(),
    ));
    let r = gw.chat("m").await;
    assert_eq!(r.status, 200, "the second key answers");
    let first_key = up.requests()[0].auth();
    // The limited key is skipped while it cools down.
    for _ in 0..4 {
        gw.chat("m").await;
    }
    let reqs = up.requests();
    assert!(
        reqs[2..].iter().all(|r| r.auth() != first_key),
        "cooling key not used"
    );

    let status = get(&gw.url("/admin/status"), &[("authorization", "Bearer adm")])
        .await
        .json();
    let keys = status["clients"][0]["keys"].as_array().unwrap().clone();
    let cooling: Vec<_> = keys.iter().filter(|k| k["healthy"] == false).collect();
    assert_eq!(cooling.len(), 1);
    assert!(cooling[0]["cooldown_until"].is_string());
    assert!(!status.to_string().contains("k1") && !status.to_string().contains("\"k2\""));

    // Now the other key is limited too: every key cools, so 503 with Retry-After.
    up.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "20".into())],
        "{}".into(),
    ));
    let r = gw.chat("m").await;
    assert_eq!(r.status, 502, "the last key was tried and failed");
    let r = gw.chat("m").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_healthy_upstream");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (18..=20).contains(&retry),
        "earliest cooldown ends in ~20s, got {retry}"
    );
}

#[tokio::test]
async fn unauthorized_key_is_cooled_at_once_and_consecutive_failures_cool_a_key() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["good", "bad"],
            "max_failures: 2\ncooldown: 60s\nkey_strategy: least_used\nmodel_match: { type: exact, value: [m] }",
        )],
        "",
    ))
    .await;
    // 401 on whichever key goes first: it cools at once, the other serves.
    up.push(Reply::Json(401, json!({"error": {"message": "bad key"}})));
    let r = gw.chat("m").await;
    assert_eq!(r.status, 200);
    let reqs = up.requests();
    let (rejected, good) = (reqs[0].auth(), reqs[1].auth());
    assert_ne!(rejected, good);
    for _ in 0..3 {
        gw.chat("m").await;
    }
    assert!(up.requests()[2..].iter().all(|r| r.auth() == good));

    // Two 500s in a row (max_failures: 2) cool the remaining key: 503 after.
    up.push(Reply::Json(500, json!({})));
    up.push(Reply::Json(500, json!({})));
    assert_eq!(gw.chat("m").await.status, 502);
    assert_eq!(gw.chat("m").await.status, 502);
    assert_eq!(gw.chat("m").await.status, 503);
}

#[tokio::test]
async fn a_success_resets_the_failure_count() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "max_failures: 2\n")], "")).await;
    for _ in 0..3 {
        up.push(Reply::Json(500, json!({})));
        assert_eq!(gw.chat("m").await.status, 502);
        assert_eq!(gw.chat("m").await.status, 200);
    }
}

#[tokio::test]
async fn failover_goes_to_the_next_key_then_the_next_client_and_502_names_them() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    a.set_default(Reply::Json(503, json!({"error": "busy"})));
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "first",
                &a.url(),
                &["a1", "a2"],
                "priority: 1\nmodel_match: { type: keyword, value: [gpt] }",
            ),
            client_yaml(
                "second",
                &b.url(),
                &["b1"],
                "priority: 2\nmodel_match: { type: keyword, value: [gpt] }",
            ),
        ],
        "",
    ))
    .await;
    let r = gw.chat("gpt-x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hello from b");
    assert_eq!(a.count(), 2, "both keys of the first client were tried");

    b.set_default(Reply::Json(500, json!({})));
    let r = gw.chat("gpt-x").await;
    assert_eq!(r.status, 502);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["error"]["code"], "upstream_error");
    assert!(msg.contains("first") && msg.contains("second"), "{msg}");
    assert!(
        !msg.contains(&a.addr.to_string()) && !msg.contains("a1"),
        "names only: {msg}"
    );
}

#[tokio::test]
async fn statuses_not_retried_pass_through_unchanged() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let gw = Gateway::start(&config(&primary_and_backup(&a, &b), "")).await;
    for status in [400u16, 404, 413, 422] {
        a.push(Reply::Raw(
            status,
            vec![("x-upstream".into(), "yes".into())],
            format!("{{\"error\":{{\"message\":\"upstream says {status}\"}}}}"),
        ));
        let r = gw.chat("m").await;
        assert_eq!(r.status, status);
        assert_eq!(r.headers["x-upstream"], "yes");
        assert_eq!(
            r.text(),
            format!("{{\"error\":{{\"message\":\"upstream says {status}\"}}}}")
        );
    }
    assert_eq!(b.count(), 0);
}

#[tokio::test]
async fn retry_on_decides_whether_429_moves_on() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "a",
                &a.url(),
                &["k"],
                "priority: 1\nretry_on: [500]\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "b",
                &b.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "",
    ))
    .await;
    a.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "5".into())],
        "{\"error\":\"slow down\"}".into(),
    ));
    let r = gw.chat("m").await;
    assert_eq!(
        r.status, 429,
        "429 is not in this client's retry_on: the caller gets it"
    );
    // ...but the key cooled down all the same, so the next request skips it.
    let r = gw.chat("m").await;
    assert_eq!(r.status, 200);
    assert_eq!(b.count(), 1);
}

#[tokio::test]
async fn fallback_chain_is_followed_in_order_and_stops_at_max_depth() {
    let bad = MockUpstream::start("bad").await;
    bad.set_default(Reply::Json(500, json!({})));
    let good = MockUpstream::start("good").await;
    let clients = |depth: u32| {
        config(
            &[
                client_yaml(
                    "m1",
                    &bad.url(),
                    &["k"],
                    "fallback: [m2]\nmodel_match: { type: exact, value: [m1] }",
                ),
                client_yaml(
                    "m2",
                    &bad.url(),
                    &["k"],
                    "fallback: [m3, m4]\nmodel_match: { type: exact, value: [m2] }",
                ),
                client_yaml(
                    "m3",
                    &bad.url(),
                    &["k"],
                    "model_match: { type: exact, value: [m3] }",
                ),
                client_yaml(
                    "m4",
                    &good.url(),
                    &["k"],
                    "upstream_model: real-m4\nmodel_match: { type: exact, value: [m4] }",
                ),
            ],
            &format!("routing:\n  max_fallback_depth: {depth}\n  max_failures: 100\n"),
        )
    };
    let gw = Gateway::start(&clients(3)).await;
    let r = gw.chat("m1").await;
    assert_eq!(r.status, 200);
    let models: Vec<String> = bad
        .requests()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(models, vec!["m1", "m2", "m3"]);
    assert_eq!(good.requests()[0].json()["model"], "real-m4");

    let gw1 = Gateway::start(&clients(1)).await;
    let r = gw1.chat("m1").await;
    assert_eq!(r.status, 502, "depth 1 reaches m2 only");
    assert_eq!(good.count(), 1);
}

#[tokio::test]
async fn max_attempts_bounds_the_whole_request() {
    let bad = MockUpstream::start("bad").await;
    bad.set_default(Reply::Json(502, json!({})));
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "a",
                &bad.url(),
                &["1", "2", "3"],
                "priority: 1\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "b",
                &bad.url(),
                &["4", "5", "6"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "routing:\n  max_attempts: 4\n  max_failures: 100\n",
    ))
    .await;
    assert_eq!(gw.chat("m").await.status, 502);
    assert_eq!(bad.count(), 4);
}

#[tokio::test]
async fn pinned_requests_go_to_the_named_client_without_fallback() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "alpha",
                &a.url(),
                &["k"],
                "priority: 1\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "beta",
                &b.url(),
                &["k"],
                "priority: 2\nfallback: m\nmodel_match: { type: exact, value: [other] }",
            ),
        ],
        "",
    ))
    .await;
    let r = post(&gw.url("/beta/v1/chat/completions"), chat("m")).await;
    assert_eq!(r.status, 200);
    assert_eq!((a.count(), b.count()), (0, 1));
    assert_eq!(
        b.requests()[0].json()["model"],
        "m",
        "no model matching on a pinned request"
    );
    b.set_default(Reply::Json(500, json!({})));
    assert_eq!(
        post(&gw.url("/beta/v1/chat/completions"), chat("other"))
            .await
            .status,
        502
    );
    assert_eq!(a.count(), 0, "pinned requests never fall back");
    let r = post(&gw.url("/nobody/v1/chat/completions"), chat("m")).await;
    assert_eq!(r.status, 404);
    // Pinned GETs are proxied too.
    let r = get(&gw.url("/alpha/v1/models"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(a.requests().last().unwrap().uri, "/v1/models");
}

#[tokio::test]
async fn inbound_auth_tokens_and_caller_names() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "server:\n  auth_tokens:\n    - \"bare-token\"\n    - {{ name: batch, token: \"named-token\" }}\nusage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    let url = gw.url("/v1/chat/completions");
    let r = post(&url, chat("m")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        post_with(&url, chat("m"), &[("authorization", "Bearer wrong")])
            .await
            .status,
        401
    );
    assert_eq!(
        post_with(&url, chat("m"), &[("authorization", "Bearer bare-token")])
            .await
            .status,
        200
    );
    assert_eq!(
        post_with(&url, chat("m"), &[("authorization", "Bearer named-token")])
            .await
            .status,
        200
    );
    assert_eq!(get(&gw.url("/v1/models"), &[]).await.status, 401);
    assert_eq!(get(&gw.url("/metrics"), &[]).await.status, 401);
    assert_eq!(get(&gw.url("/healthz"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/readyz"), &[]).await.status, 200);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn request_errors_have_openais_shape_and_status() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "server:\n  max_body_bytes: 1000\nusage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    let url = gw.url("/v1/chat/completions");
    let cases: Vec<(Reply2, u16, &str)> = vec![
        (
            send(post_req(&url, "not json", &[])).await,
            400,
            "invalid_request_error",
        ),
        (
            post(&url, json!({"messages": []})).await,
            400,
            "invalid_request_error",
        ),
        (
            post(&url, json!({"model": 42})).await,
            400,
            "invalid_request_error",
        ),
        (
            post(&url, chat("unknown-model")).await,
            404,
            "model_not_found",
        ),
        (
            post(&url, json!({"model": "m", "pad": "x".repeat(2000)})).await,
            413,
            "request_too_large",
        ),
        (get(&url, &[]).await, 405, "method_not_allowed"),
        (
            get(&gw.url("/v1/../admin/status"), &[]).await,
            404,
            "not_found",
        ),
        (
            post(&gw.url("/v1/a/%2e%2e/b"), chat("m")).await,
            404,
            "not_found",
        ),
    ];
    for (r, status, code) in cases {
        assert_eq!(r.status, status, "{}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code);
        assert!(e["message"].is_string() && e.get("type").is_some() && e.get("param").is_some());
        assert!(r.headers.contains_key("x-request-id"));
    }
    // Broken JSON gets one kind of answer, whatever its first byte.
    for body in ["not json", "{bad", "[1,"] {
        let r = send(post_req(&url, body, &[])).await;
        assert_eq!(r.status, 400);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with("the request body is not valid JSON: "),
            "{body}: {message}"
        );
    }
    let r = send(post_req(&url, "[\"m\"]", &[])).await;
    assert_eq!(
        r.json()["error"]["message"],
        "the request body must be a JSON object"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn models_lists_every_exact_name() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "a",
                &up.url(),
                &["k"],
                "model_match: { type: exact, value: [gpt-4o, \"org/model-1\"] }",
            ),
            client_yaml(
                "b",
                &up.url(),
                &["k"],
                "model_match: { type: keyword, value: [claude] }",
            ),
        ],
        "",
    ))
    .await;
    let list = get(&gw.url("/v1/models"), &[]).await.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["gpt-4o", "org/model-1"]);
    assert_eq!(list["data"][0]["owned_by"], "a");
    let one = get(&gw.url("/v1/models/org/model-1"), &[]).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "org/model-1");
    assert_eq!(get(&gw.url("/v1/models/nope"), &[]).await.status, 404);
}

#[tokio::test]
async fn transforms_apply_per_client_and_never_override_the_caller() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["k"],
            "upstream_model: vendor/model-x\nstop: [\"<|end|>\"]\nmax_tokens: 256\nextra_body: { top_k: 40, temperature: 1.5 }\nheaders: { api-version: \"2024-06-01\" }\nspecial_prefix: \"<think>\"\nmodel_match: { type: exact, value: [alias] }",
        )],
        "",
    ))
    .await;
    let r = post(
        &gw.url("/v1/chat/completions"),
        json!({"model": "alias", "temperature": 0.1, "messages": []}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "<think>hello from up"
    );
    let sent = up.requests()[0].json();
    assert_eq!(sent["model"], "vendor/model-x");
    assert_eq!(sent["stop"], json!(["<|end|>"]));
    assert_eq!(sent["max_tokens"], 256);
    assert_eq!(sent["top_k"], 40);
    assert_eq!(sent["temperature"], 0.1, "the caller's value wins");
    assert_eq!(up.requests()[0].headers["api-version"], "2024-06-01");

    // The caller's own stop and max_completion_tokens are kept.
    post(
        &gw.url("/v1/chat/completions"),
        json!({"model": "alias", "stop": "X", "max_completion_tokens": 5, "messages": []}),
    )
    .await;
    let sent = up.requests()[1].json();
    assert_eq!(sent["stop"], "X");
    assert!(sent.get("max_tokens").is_none());
    assert_eq!(sent["max_completion_tokens"], 5);
}

#[tokio::test]
async fn untouched_bodies_go_upstream_byte_for_byte() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let raw = "{ \"model\":\"m\",   \"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9\"}], \"z\": 1.50 }";
    let r = send(post_req(&gw.url("/v1/chat/completions"), raw, &[])).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests()[0].body, raw.as_bytes());
}

#[tokio::test]
async fn stream_chunks_arrive_before_the_upstream_sends_the_next() {
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(Semaphore::new(0));
    up.push(Reply::Sse {
        events: vec![
            chat_chunk("one"),
            chat_chunk("two"),
            chat_chunk("three"),
            usage_chunk(3, 3),
            DONE.to_owned(),
        ],
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let resp = gw.stream("m").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The mock sends each next event only after the gateway delivered the previous one.
    for word in ["one", "two", "three"] {
        let chunk = next_chunk(&mut body).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&chunk).contains(word), "{chunk:?}");
        gate.add_permits(1);
    }
    gate.add_permits(1);
    let rest = read_all(&mut body).await.unwrap();
    // gptbalance asked for usage itself, so the usage chunk is removed.
    assert_eq!(rest, DONE);
    assert_eq!(
        up.requests()[0].json()["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn a_caller_that_asked_for_usage_gets_the_usage_chunk() {
    let up = MockUpstream::start("up").await;
    up.push(Reply::Sse {
        events: vec![chat_chunk("hi"), usage_chunk(2, 1), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let mut resp = open_stream(&gw.url("/v1/chat/completions"), body).await;
    let all = read_all(resp.body_mut()).await.unwrap();
    assert_eq!(
        all,
        format!("{}{}{}", chat_chunk("hi"), usage_chunk(2, 1), DONE),
        "passed through byte for byte"
    );
}

#[tokio::test]
async fn stream_special_prefix_goes_on_the_first_content_delta() {
    let up = MockUpstream::start("up").await;
    up.push(Reply::Sse {
        events: vec![chat_chunk("a"), chat_chunk("b"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(
        &[one_client(&up, "special_prefix: \"<think>\\n\"\n")],
        "",
    ))
    .await;
    let mut resp = gw.stream("m").await;
    let all = read_all(resp.body_mut()).await.unwrap();
    assert!(all.contains("\"content\":\"<think>\\na\""), "{all}");
    assert_eq!(all.matches("<think>").count(), 1);
    assert!(all.ends_with(DONE));
}

#[tokio::test]
async fn a_stream_that_dies_before_its_first_byte_fails_over() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    a.push(Reply::DieBeforeBody);
    b.push(Reply::Sse {
        events: vec![chat_chunk("from b"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(&primary_and_backup(&a, &b), "")).await;
    let mut resp = gw.stream("m").await;
    assert_eq!(resp.status(), 200);
    let all = read_all(resp.body_mut()).await.unwrap();
    assert!(all.contains("from b"));
}

#[tokio::test]
async fn timeouts_before_headers_fail_over_and_end_in_504() {
    let slow = MockUpstream::start("slow").await;
    slow.set_default(Reply::Hang);
    let fast = MockUpstream::start("fast").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "slow",
                &slow.url(),
                &["k"],
                "priority: 1\nrequest_timeout: 300ms\nmodel_match: { type: keyword, value: [m] }",
            ),
            client_yaml(
                "fast",
                &fast.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "",
    ))
    .await;
    // "m" matches `fast` exactly, so only `fast` is a candidate.
    assert_eq!(gw.chat("m").await.status, 200);
    let r = gw.chat("mx").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn connection_refused_and_resets_fail_over() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let reset = MockUpstream::start("reset").await;
    reset.set_default(Reply::Reset);
    let ok = MockUpstream::start("ok").await;
    let gw = Gateway::start(&config(
        &[
            client_yaml(
                "closed",
                &format!("http://{closed}/v1"),
                &["k"],
                "priority: 1\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "reset",
                &reset.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "ok",
                &ok.url(),
                &["k"],
                "priority: 3\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "",
    ))
    .await;
    let r = gw.chat("m").await;
    assert_eq!(r.status, 200);
    assert_eq!(reset.count(), 1);
}

#[tokio::test]
async fn an_upstream_that_dies_mid_stream_aborts_the_callers_response() {
    let up = MockUpstream::start("up").await;
    up.push(Reply::Sse {
        events: vec![chat_chunk("partial")],
        gate: None,
        abort_at_end: true,
    });
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let mut resp = gw.stream("m").await;
    let got = read_all(resp.body_mut()).await;
    let partial = got.expect_err("the response must not end cleanly");
    assert!(partial.contains("partial"));
    assert!(!partial.contains("[DONE]"), "no invented [DONE]");
}

#[tokio::test]
async fn an_idle_stream_is_aborted_after_idle_timeout() {
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(Semaphore::new(0));
    up.push(Reply::Sse {
        events: vec![chat_chunk("first"), chat_chunk("never")],
        gate: Some(gate),
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(&[one_client(&up, "idle_timeout: 300ms\n")], "")).await;
    let mut resp = gw.stream("m").await;
    let got = read_all(resp.body_mut()).await;
    assert!(got.expect_err("aborted").contains("first"));
}

#[tokio::test]
async fn a_caller_that_leaves_a_quiet_stream_cancels_it_without_waiting_for_a_chunk() {
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(Semaphore::new(0));
    up.push(Reply::Sse {
        events: vec![chat_chunk("first"), chat_chunk("second"), DONE.to_owned()],
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let mut resp = gw.stream("m").await;
    next_chunk(resp.body_mut()).await.unwrap().unwrap();
    drop(resp);
    // The upstream says nothing more for a while: the gateway must see the
    // caller leave from the connection itself, not from a failed write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One more event: it can only fail to send if the gateway had already
    // dropped the upstream request (relayed to the closed caller, one
    // write would still succeed and the mock would wait for the next).
    gate.add_permits(1);
    assert!(
        eventually(Duration::from_secs(5), || up.cancelled_streams() == 1).await,
        "the upstream stream was cancelled"
    );
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_the_upstream_request() {
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(Semaphore::new(0));
    // Many events: the mock notices the closed connection on a later send.
    let events = (0..200)
        .map(|i| chat_chunk(&format!("part {i} {}", "x".repeat(1000))))
        .collect();
    up.push(Reply::Sse {
        events,
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    up.push(Reply::Hang);
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    // Mid-stream: read one chunk, then leave.
    let mut resp = gw.stream("m").await;
    next_chunk(resp.body_mut()).await.unwrap().unwrap();
    drop(resp);
    gate.add_permits(200);
    assert!(
        eventually(Duration::from_secs(5), || up.cancelled_streams() == 1).await,
        "the upstream stream was cancelled"
    );
    // Before headers: the upstream has not answered yet when the caller leaves.
    let url = gw.url("/v1/chat/completions");
    let pending = tokio::spawn(async move { post(&url, chat("m")).await });
    assert!(eventually(Duration::from_secs(5), || up.count() == 2).await);
    pending.abort();
    assert!(
        eventually(Duration::from_secs(5), || up.dropped_requests() == 1).await,
        "the pending upstream request was dropped"
    );
}

/// The request shapes the official OpenAI SDKs send.
#[tokio::test]
async fn openai_sdk_request_shapes() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &[client_yaml(
            "c",
            &up.url(),
            &["k"],
            "model_match: { type: keyword, value: [gpt, text-embedding, davinci] }",
        )],
        "",
    ))
    .await;
    let sdk_headers = [
        ("authorization", "Bearer sk-anything"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-retry-count", "0"),
        ("accept", "application/json"),
    ];
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "model": "gpt-4o-mini", "temperature": 0.2, "n": 1}),
        &sdk_headers,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");

    up.push(Reply::Json(200, json!({"id": "c", "object": "text_completion", "choices": [{"text": "x", "index": 0}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})));
    let r = post_with(
        &gw.url("/v1/completions"),
        json!({"model": "davinci-002", "prompt": "Say hi", "max_tokens": 5}),
        &sdk_headers,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests()[1].uri, "/v1/completions");

    up.push(Reply::Json(200, json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 2, "total_tokens": 2}})));
    let r = post_with(
        &gw.url("/v1/embeddings"),
        json!({"input": ["hello"], "model": "text-embedding-3-small", "encoding_format": "base64"}),
        &sdk_headers,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests()[2].uri, "/v1/embeddings");
    assert_eq!(up.requests()[2].json()["encoding_format"], "base64");

    up.push(Reply::Sse {
        events: vec![chat_chunk("x"), usage_chunk(1, 1), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let mut resp = open_stream(
        &gw.url("/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let all = read_all(resp.body_mut()).await.unwrap();
    assert!(all.contains("\"usage\"") && all.ends_with(DONE));
    for r in &up.requests()[..3] {
        assert_eq!(
            r.headers["user-agent"], "OpenAI/Python 1.54.0",
            "SDK headers pass through"
        );
        assert_eq!(r.auth(), "Bearer k");
    }
}

/// A chat completion request as it goes on the wire, framed by Content-Length.
fn raw_chat(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn upstream_response_headers_reach_the_caller_on_both_server_paths() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = r#"{"model":"m","messages":[]}"#;
    let answer = |extra: &str| {
        vec![
            ("x-ratelimit-remaining-tokens".to_owned(), "99".to_owned()),
            ("openai-processing-ms".to_owned(), extra.to_owned()),
            ("retry-after".to_owned(), "7".to_owned()),
            ("x-request-id".to_owned(), "upstream-id".to_owned()),
            ("keep-alive".to_owned(), "timeout=5".to_owned()),
            ("upgrade".to_owned(), "h2c".to_owned()),
        ]
    };
    // HTTP/1.1 (the gateway's own loop), then HTTP/1.0 (handed to hyper).
    for (version, extra) in [("1.1", "11"), ("1.0", "10")] {
        up.push(Reply::Raw(200, answer(extra), r#"{"ok":true}"#.to_owned()));
        let request = format!(
            "POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = raw_exchange(gw.addr, request.as_bytes()).await;
        let (head, rest) = text.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with(&format!("HTTP/{version} 200")), "{head}");
        assert_eq!(rest, r#"{"ok":true}"#);
        let lines: Vec<String> = head.lines().skip(1).map(str::to_ascii_lowercase).collect();
        let values = |name: &str| -> Vec<&str> {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
                .collect()
        };
        assert_eq!(values("x-ratelimit-remaining-tokens"), ["99"], "{head}");
        assert_eq!(values("openai-processing-ms"), [extra], "{head}");
        assert_eq!(values("retry-after"), ["7"], "{head}");
        assert_eq!(values("content-type"), ["application/json"], "{head}");
        // The gateway's own id, once; hop-by-hop headers stop here.
        let ids = values("x-request-id");
        assert!(ids.len() == 1 && ids[0].starts_with("req_"), "{head}");
        assert!(values("keep-alive").is_empty(), "{head}");
        assert!(values("upgrade").is_empty(), "{head}");
    }
}

#[tokio::test]
async fn conflicting_request_framing_gets_400_and_a_closed_connection() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = r#"{"model":"m","messages":[]}"#;
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let both = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}",
        chunked.len()
    );
    let answer = raw_exchange(gw.addr, both.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"));

    let two_lengths = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nContent-Length: 3\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(gw.addr, two_lengths.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A good request pipelined before the bad one is served normally.
    let good = raw_chat(body);
    let answer = raw_exchange(gw.addr, format!("{good}{both}").as_bytes()).await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &answer[i..i + 12])
        .collect();
    assert_eq!(statuses, vec!["HTTP/1.1 200", "HTTP/1.1 400"], "{answer}");
    assert_eq!(
        up.count(),
        1,
        "the conflicting request never reached an upstream"
    );
}

/// Statuses of the responses in `answer`, in order.
fn statuses(answer: &str) -> Vec<&str> {
    answer
        .match_indices("HTTP/1.")
        .map(|(i, _)| &answer[i + 9..i + 12])
        .collect()
}

#[tokio::test]
async fn keep_alive_requests_are_answered_in_order_with_date_and_length() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = r#"{"model":"m","messages":[]}"#;
    let one = raw_chat(body);
    // Pipelined: a chat, the gateway's own /healthz (no upstream Date to
    // pass on), a chat whose body arrives a byte at a time, and a chat
    // asking to close.
    let close = one.replace("Host: x", "Host: x\r\nConnection: close");
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("{one}{health}{}", &one[..one.len() - body.len()]).as_bytes())
        .await
        .unwrap();
    // Its last byte comes in one write with the next request, which must
    // not be taken for body.
    let (most, last) = body.as_bytes().split_at(body.len() - 1);
    for b in most {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.write_all(&[last, close.as_bytes()].concat())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed after the request that asked for it")
        .unwrap();
    let answer = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(
        statuses(&answer),
        vec!["200", "200", "200", "200"],
        "{answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert_eq!(lower.matches("\r\ndate: ").count(), 4, "{answer}");
    assert_eq!(lower.matches("\r\ncontent-length: ").count(), 4, "{answer}");
    assert!(lower.contains("\r\n\r\nok\nhttp/1.1 200"), "{answer}");
    assert_eq!(lower.matches("\r\nx-request-id: ").count(), 4, "{answer}");
    assert_eq!(
        lower.matches("\r\nconnection: close").count(),
        1,
        "{answer}"
    );
    up.assert_bodies(3, body.as_bytes());
}

#[tokio::test]
async fn a_connection_goes_on_after_a_request_the_fast_path_hands_over() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = r#"{"model":"m","messages":[]}"#;
    let usual = raw_chat(body);
    // A chunked body, then `Expect: 100-continue`: both served by hyper,
    // on the connection the fast path started.
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let expect = usual.replace("Host: x", "Host: x\r\nExpect: 100-continue");
    let last = usual.replace("Host: x", "Host: x\r\nConnection: close");
    let answer = raw_exchange(
        gw.addr,
        format!("{usual}{chunked}{expect}{last}").as_bytes(),
    )
    .await;
    let codes: Vec<&str> = statuses(&answer)
        .into_iter()
        .filter(|c| *c != "100")
        .collect();
    assert_eq!(codes, vec!["200", "200", "200", "200"], "{answer}");
    up.assert_bodies(4, body.as_bytes());
}

#[tokio::test]
async fn odd_requests_get_hypers_answers() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "server:\n  max_body_bytes: 1000\nusage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    // HTTP/1.0: answered, then closed.
    let answer = raw_exchange(gw.addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.contains(" 200 ") && answer.ends_with("ok\n"),
        "{answer}"
    );
    // A head that is not HTTP: 400 and closed.
    let answer = raw_exchange(gw.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A declared body over max_body_bytes: 413 without reading it, and
    // the connection closes (the unread body cannot be taken for a head).
    let answer = raw_exchange(
        gw.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // HEAD and other methods go to hyper and the router's answer.
    let answer = raw_exchange(
        gw.addr,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.ends_with("ok\n"), "no body for HEAD: {answer}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_large_body_arrives_whole() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let body = json!({"model": "m", "messages": [], "pad": "y".repeat(300_000)}).to_string();
    let r = send(post_req(&gw.url("/v1/chat/completions"), body.clone(), &[])).await;
    assert_eq!(r.status, 200);
    let r = send(post_req(&gw.url("/v1/chat/completions"), body.clone(), &[])).await;
    assert_eq!(r.status, 200);
    up.assert_bodies(2, body.as_bytes());
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = post_req(&gw.url("/v1/chat/completions"), chat("m").to_string(), &[]);
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

/// The official OpenAI Python SDK against the gateway. The test never
/// passes without running: it finds a Python with the `openai` package
/// (`$GPTBALANCE_PYTHON`, else `python3`, else a venv under `target/`
/// that it makes and installs the package into once) or fails saying how
/// to get one.
#[tokio::test]
async fn the_official_openai_python_sdk_works_end_to_end() {
    let chosen = std::env::var_os("GPTBALANCE_PYTHON");
    let python = match tokio::task::spawn_blocking(move || python_with_openai(chosen))
        .await
        .unwrap()
    {
        Ok(p) => p,
        Err(why) => panic!(
            "this test drives the official OpenAI Python SDK and found no Python with the \
             `openai` package: {why}\nInstall it (`pip install openai`), point \
             GPTBALANCE_PYTHON at a python that has it, or leave this one test out: \
             cargo test --locked -- --skip the_official_openai_python_sdk"
        ),
    };
    let up = MockUpstream::start("sdk").await;
    let stream = |usage: bool| Reply::Sse {
        events: [
            vec![chat_chunk("Hello"), chat_chunk(" there")],
            if usage {
                vec![usage_chunk(2, 3)]
            } else {
                vec![]
            },
            vec![DONE.to_owned()],
        ]
        .concat(),
        gate: None,
        abort_at_end: false,
    };
    up.push(Reply::Ok);
    up.push(Reply::Json(200, json!({"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"text": "hi", "index": 0, "finish_reason": "stop", "logprobs": null}]})));
    up.push(Reply::Json(200, json!({"object": "list", "model": "e", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}, {"object": "embedding", "index": 1, "embedding": [0.2]}], "usage": {"prompt_tokens": 2, "total_tokens": 2}})));
    up.push(stream(true));
    up.push(stream(true));
    let gw = Gateway::start(&format!(
        "server:\n  auth_tokens: [\"sdk-token\"]\nusage:\n  enabled: false\nopenai_clients:\n{}{}",
        client_yaml(
            "sdk",
            &up.url(),
            &["k"],
            "model_match: { type: exact, value: [gpt-4o] }"
        ),
        client_yaml(
            "pool",
            &up.url(),
            &["k"],
            "model_match: { type: keyword, value: [gpt, text-embedding] }"
        ),
    ))
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");
    let base = gw.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args([script, &base, "sdk-token"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reqs = up.requests();
    assert_eq!(reqs.len(), 5);
    assert!(reqs.iter().all(|r| r.auth() == "Bearer k"));
    assert!(reqs[0].headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("OpenAI/Python"));
}

/// Whether `python` can import the `openai` package.
fn imports_openai(python: &std::path::Path) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import openai"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Python that can import `openai`: `chosen` (from `$GPTBALANCE_PYTHON`)
/// when given, else `python3`, else `target/tmp/openai-sdk-venv`, made
/// and filled with `pip install openai` the first time (which needs the
/// network). `Err` says what was tried.
fn python_with_openai(chosen: Option<std::ffi::OsString>) -> Result<std::path::PathBuf, String> {
    use std::path::PathBuf;
    if let Some(p) = chosen {
        let p = PathBuf::from(p);
        return if imports_openai(&p) {
            Ok(p)
        } else {
            Err(format!(
                "GPTBALANCE_PYTHON={} cannot import openai",
                p.display()
            ))
        };
    }
    if imports_openai(std::path::Path::new("python3")) {
        return Ok(PathBuf::from("python3"));
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-sdk-venv");
    let python = venv.join("bin").join("python");
    if imports_openai(&python) {
        return Ok(python);
    }
    let run = |cmd: &mut std::process::Command, what: &str| -> Result<(), String> {
        match cmd.output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("{what} failed: {e}")),
        }
    };
    if !python.exists() {
        run(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv),
            &format!("python3 -m venv {}", venv.display()),
        )?;
    }
    run(
        std::process::Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ]),
        &format!("{} -m pip install openai", python.display()),
    )?;
    if imports_openai(&python) {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import openai after installing it",
            python.display()
        ))
    }
}

#[test]
fn a_python_without_the_sdk_is_an_error_not_a_skip() {
    let missing = tempfile::tempdir().unwrap().path().join("python");
    let err = python_with_openai(Some(missing.clone().into())).unwrap_err();
    assert_eq!(
        err,
        format!(
            "GPTBALANCE_PYTHON={} cannot import openai",
            missing.display()
        )
    );
}

/// `OPTIONS` with the headers a browser sends before a cross-origin call.
async fn preflight(url: &str, origin: &str, request_headers: &str) -> Reply2 {
    let req = http::Request::builder()
        .method("OPTIONS")
        .uri(url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", request_headers)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    send(req).await
}

#[tokio::test]
async fn cors_answers_preflights_and_marks_responses_for_allowed_origins_only() {
    let up = MockUpstream::start("up").await;
    let token = "a-browser-app-token-0123";
    let gw = Gateway::start(&config(
        &[one_client(&up, "")],
        &format!(
            "server:\n  auth_tokens: [\"{token}\"]\n  cors:\n    allow_origins: [\"https://app.example.com\", \"http://localhost:5173\"]\n"
        ),
    ))
    .await;
    let url = gw.url("/v1/chat/completions");
    let app = "https://app.example.com";
    let asked = "authorization, content-type, x-stainless-os";

    // A preflight carries no token and is answered before auth.
    let r = preflight(&url, app, asked).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let h = |r: &Reply2, name: &str| -> Vec<String> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(h(&r, "access-control-allow-origin"), [app]);
    assert_eq!(
        h(&r, "access-control-allow-methods"),
        ["GET, POST, OPTIONS"]
    );
    assert_eq!(h(&r, "access-control-allow-headers"), [asked]);
    assert_eq!(h(&r, "access-control-max-age"), ["600"]);
    assert!(
        h(&r, "vary").contains(&"origin".to_owned()),
        "{:?}",
        r.headers
    );

    // The real request, and an error, are readable by the page.
    let auth = format!("Bearer {token}");
    let r = post_with(
        &url,
        chat("m"),
        &[("origin", app), ("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(h(&r, "access-control-allow-origin"), [app]);
    assert_eq!(
        h(&r, "access-control-expose-headers"),
        ["x-request-id, retry-after"]
    );
    let r = post_with(&url, chat("m"), &[("origin", "http://localhost:5173")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        h(&r, "access-control-allow-origin"),
        ["http://localhost:5173"]
    );

    // Another origin, or none: no CORS header, and OPTIONS is not served.
    let r = preflight(&url, "https://evil.example", asked).await;
    assert_ne!(r.status, 204);
    assert!(h(&r, "access-control-allow-origin").is_empty());
    let r = post_with(
        &url,
        chat("m"),
        &[("origin", "https://evil.example"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(h(&r, "access-control-allow-origin").is_empty());
    let r = post_with(&url, chat("m"), &[("authorization", &auth)]).await;
    assert!(h(&r, "access-control-allow-origin").is_empty());

    // Listed headers are the only ones allowed; without server.cors,
    // nothing changes.
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap().replace(
        "    allow_origins:",
        "    allow_headers: [Authorization, Content-Type]\n    allow_origins:",
    );
    std::fs::write(gw.config_path(), yaml).unwrap();
    assert!(gw.wait_generation(2).await);
    let r = preflight(&url, app, asked).await;
    assert_eq!(
        h(&r, "access-control-allow-headers"),
        ["authorization, content-type"]
    );
    let plain = Gateway::start(&config(&[one_client(&up, "")], "")).await;
    let r = preflight(&plain.url("/v1/chat/completions"), app, asked).await;
    assert_eq!(r.status, 405);
    assert!(h(&r, "access-control-allow-origin").is_empty());
    let r = post_with(
        &plain.url("/v1/chat/completions"),
        chat("m"),
        &[("origin", app)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(h(&r, "access-control-allow-origin").is_empty());
}

/// The ids `GET /v1/models` lists, with their owners.
async fn listed_models(gw: &Gateway) -> Vec<(String, String)> {
    let list = get(&gw.url("/v1/models"), &[]).await.json();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["owned_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls `/v1/models` until it lists `id` (5 s at most).
async fn wait_listed(gw: &Gateway, id: &str) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = listed_models(gw).await;
        if listed.iter().any(|(m, _)| m == id) || tokio::time::Instant::now() > deadline {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn discovered_models_are_listed_when_they_route_and_every_routed_name_resolves() {
    let pool = MockUpstream::start("pool").await;
    let exact = MockUpstream::start("exact").await;
    let list = |ids: &[&str]| {
        let data: Vec<_> = ids
            .iter()
            .map(|id| json!({"id": id, "object": "model", "owned_by": "upstream"}))
            .collect();
        Reply::Json(200, json!({"object": "list", "data": data}))
    };
    pool.push(list(&[
        "gpt-4o",
        "gpt-4o-mini",
        "whisper-1",
        "text-embedding-3-small",
    ]));
    let yaml = |pool_extra: &str| {
        config(
            &[
                client_yaml(
                    "exact",
                    &exact.url(),
                    &["k-exact"],
                    "model_match: { type: exact, value: [gpt-4o] }",
                ),
                client_yaml(
                    "pool",
                    &pool.url(),
                    &["k-pool-1", "k-pool-2"],
                    &format!("discover_models: true\n{pool_extra}model_match: {{ type: keyword, value: [gpt] }}"),
                ),
            ],
            "",
        )
    };
    let gw = Gateway::start(&yaml("")).await;

    // Exact names first; then what the upstream lists and the client's own
    // rule matches (not whisper-1 or the embedding model), each once.
    let listed = wait_listed(&gw, "gpt-4o-mini").await;
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        listed,
        [pair("gpt-4o", "exact"), pair("gpt-4o-mini", "pool")]
    );
    let asked = pool.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        (asked[0].method.as_str(), asked[0].uri.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(asked[0].auth(), "Bearer k-pool-1");
    assert_eq!(
        exact.count(),
        0,
        "clients without discover_models are not asked"
    );

    // Every name that routes resolves, listed or not; others do not.
    for (id, owner) in [
        ("gpt-4o-mini", "pool"),
        ("gpt-anything", "pool"),
        ("gpt-4o", "exact"),
    ] {
        let one = get(&gw.url(&format!("/v1/models/{id}")), &[]).await;
        assert_eq!(one.status, 200, "{id}");
        assert_eq!(one.json()["owned_by"], owner, "{id}");
    }
    assert_eq!(get(&gw.url("/v1/models/whisper-1"), &[]).await.status, 404);

    // A reload fetches again.
    pool.push(list(&["gpt-5", "dall-e-3"]));
    std::fs::write(gw.config_path(), yaml("priority: 5\n")).unwrap();
    assert!(gw.wait_generation(2).await);
    let listed = wait_listed(&gw, "gpt-5").await;
    assert_eq!(listed, [pair("gpt-4o", "exact"), pair("gpt-5", "pool")]);

    // A failed fetch keeps the last list.
    pool.push(Reply::Json(500, json!({"error": {"message": "down"}})));
    std::fs::write(gw.config_path(), yaml("priority: 6\n")).unwrap();
    assert!(gw.wait_generation(3).await);
    assert!(eventually(Duration::from_secs(5), || pool.count() == 3).await);
    assert_eq!(
        listed_models(&gw).await,
        [pair("gpt-4o", "exact"), pair("gpt-5", "pool")]
    );
}

/// A form upload (`audio/transcriptions`) is routed by the `model` part of
/// its `multipart/form-data` body, and the body reaches the upstream as it
/// came, bytes and content type alike.
#[tokio::test]
async fn multipart_uploads_are_routed_by_their_model_part() {
    let whisper = MockUpstream::start("whisper").await;
    whisper.set_default(Reply::Json(200, serde_json::json!({"text": "hello"})));
    let other = MockUpstream::start("other").await;
    let gw = Gateway::start(&format!(
        "usage:\n  enabled: false\nopenai_clients:\n{}{}",
        client_yaml(
            "audio",
            &whisper.url(),
            &["k1"],
            "model_match: { type: exact, value: [whisper-1] }"
        ),
        client_yaml(
            "chat",
            &other.url(),
            &["k2"],
            "model_match: { type: keyword, value: [gpt] }"
        ),
    ))
    .await;
    let boundary = "----form-boundary-7MA4YWxk";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    body.extend_from_slice(&[0u8, 1, 2, 3, 255, 13, 10, 45, 45]);
    body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let req = http::Request::post(gw.url("/v1/audio/transcriptions"))
        .header("content-type", &ct)
        .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = whisper.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri, "/v1/audio/transcriptions");
    assert_eq!(got[0].body.as_ref(), body.as_slice());
    assert_eq!(got[0].headers["content-type"], ct.as_str());
    assert_eq!(other.count(), 0);
    // A form without a model part: 400, like a JSON body without one.
    let req = http::Request::post(gw.url("/v1/audio/transcriptions"))
        .header("content-type", &ct)
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            "--{boundary}--\r\n"
        ))))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("no `model`"), "{}", r.text());
}

/// A request whose every attempt failed is recorded against the last
/// client and key it tried, so `usage --by client` shows who failed.
#[tokio::test]
async fn a_failed_request_blames_the_last_client_and_key_tried() {
    let down = MockUpstream::start("down").await;
    down.set_default(Reply::Json(
        503,
        serde_json::json!({"error": {"message": "busy"}}),
    ));
    let gw = Gateway::start(&format!(
        "usage:\n  dir: ./usage\nopenai_clients:\n{}",
        client_yaml(
            "flaky",
            &down.url(),
            &["k-flaky"],
            "max_attempts: 1\nmodel_match: { type: exact, value: [m] }"
        ),
    ))
    .await;
    let r = gw.chat("m").await;
    assert_eq!(r.status, 502);
    let dir = gw.stop().await;
    let month = &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7];
    let db =
        rusqlite::Connection::open(dir.path().join(format!("usage/usage-{month}.sqlite"))).unwrap();
    let (client, key, status, attempts): (Option<String>, Option<String>, i64, i64) = db
        .query_row(
            "SELECT client, key_id, status, attempts FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(client.as_deref(), Some("flaky"));
    assert_eq!(
        key,
        Some(gptbalance::secret::KeyId::of("k-flaky").to_string())
    );
    assert_eq!((status, attempts), (502, 1));
}

/// With callers set, a request without a valid token is refused on its
/// head: a body announced at 30 MB is never read, on the fast path.
#[tokio::test]
async fn a_bad_token_is_refused_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "server:\n  auth_tokens: [\"a-caller-token-0123456789\"]\nusage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\nContent-Length: 30000000\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    // Not one more byte of the body is sent: the answer comes anyway.
    let mut got = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "answered and closed without the body");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert_eq!(up.count(), 0);
}
