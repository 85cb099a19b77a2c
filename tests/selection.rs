//! Selection beyond round robin (SPEC §11), against the real gateway:
//! quota headers and `key_strategy: headroom`, affinity, the request
//! deadline and `first_token_timeout`, and `balance: latency`.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// What the keyed mock does with one request.
enum Answer {
    /// A chat completion with these extra headers.
    Ok(Vec<(&'static str, String)>),
    Status(u16, Vec<(&'static str, String)>),
    /// Never answers.
    Hang,
    /// 200 with SSE headers, then nothing, ever.
    Silent,
    /// Waits, then answers Ok.
    Delay(Duration),
}

type Rule = dyn Fn(&str, &Value) -> Answer + Send + Sync;

/// A mock upstream that answers by the request's key (its bearer token)
/// through `rule`, and records which key each request used.
struct KeyedMock {
    addr: SocketAddr,
    keys: Arc<Mutex<Vec<String>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
}

/// A body that never yields a frame.
struct Never;

impl hyper::body::Body for Never {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Pending
    }
}

type MockBody = http_body_util::Either<Full<Bytes>, Never>;

impl KeyedMock {
    async fn start(rule: impl Fn(&str, &Value) -> Answer + Send + Sync + 'static) -> KeyedMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Rule> = Arc::new(rule);
        let (k, s) = (keys.clone(), statuses.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (rule, k, s) = (rule.clone(), k.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (rule, k, s) = (rule.clone(), k.clone(), s.clone());
                        async move {
                            let key = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .trim_start_matches("Bearer ")
                                .to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            k.lock().unwrap().push(key.clone());
                            let answer = rule(&key, &body);
                            let ok = json!({
                                "id": "c1", "object": "chat.completion", "model": body["model"],
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
                            });
                            let full = |status: u16,
                                        headers: Vec<(&'static str, String)>,
                                        body: String| {
                                let mut r: Response<MockBody> = Response::new(
                                    http_body_util::Either::Left(Full::new(Bytes::from(body))),
                                );
                                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                                r.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                for (n, v) in headers {
                                    r.headers_mut().insert(n, v.parse().unwrap());
                                }
                                r
                            };
                            let resp = match answer {
                                Answer::Ok(h) => full(200, h, ok.to_string()),
                                Answer::Status(code, h) => full(
                                    code,
                                    h,
                                    json!({"error": {"message": "limited", "type": "requests"}})
                                        .to_string(),
                                ),
                                Answer::Hang => {
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                                Answer::Silent => {
                                    let mut r = Response::new(http_body_util::Either::Right(Never));
                                    r.headers_mut().insert(
                                        "content-type",
                                        "text/event-stream".parse().unwrap(),
                                    );
                                    r
                                }
                                Answer::Delay(d) => {
                                    tokio::time::sleep(d).await;
                                    full(200, vec![], ok.to_string())
                                }
                            };
                            s.lock().unwrap().push(resp.status().as_u16());
                            Ok::<_, std::io::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        KeyedMock {
            addr,
            keys,
            statuses,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone()
    }

    fn count_status(&self, code: u16) -> usize {
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|&&s| s == code)
            .count()
    }
}

fn config(routing: &str, clients: &[String]) -> String {
    format!(
        "server:\n  admin_token: adm\nusage:\n  enabled: false\nrouting:\n{routing}openai_clients:\n{}",
        clients.concat()
    )
}

async fn status(gw: &Gateway) -> Value {
    let r = get(&gw.url("/admin/status"), &[("authorization", "Bearer adm")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn metrics(gw: &Gateway) -> String {
    get(&gw.url("/metrics"), &[]).await.text()
}

/// A key's entry in `/admin/status`, found by its position in client `c`.
fn key_status(status: &Value, client: &str, i: usize) -> Value {
    status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == client)
        .unwrap()["keys"][i]
        .clone()
}

/// A provider's token quota per key, as OpenAI keeps it: each request is
/// charged its tokens, a request that does not fit gets 429 (`Retry-After:
/// 0`: tokens come back continuously), and every answer tells what is left.
fn token_quota(quotas: &[(&'static str, u64)], charge: u64) -> impl Fn(&str, &Value) -> Answer {
    let left: Mutex<HashMap<String, u64>> = Mutex::new(
        quotas
            .iter()
            .map(|&(k, q)| (k.to_owned(), q))
            .collect::<HashMap<_, _>>(),
    );
    move |key, _| {
        let mut left = left.lock().unwrap();
        let l = left.entry(key.to_owned()).or_insert(0);
        let fits = *l >= charge;
        if fits {
            *l -= charge;
        }
        let headers = vec![
            ("x-ratelimit-remaining-requests", "10000".to_owned()),
            ("x-ratelimit-reset-requests", "60s".to_owned()),
            ("x-ratelimit-remaining-tokens", l.to_string()),
            ("x-ratelimit-reset-tokens", "1m0s".to_owned()),
        ];
        if fits {
            Answer::Ok(headers)
        } else {
            let mut h = headers;
            h.push(("retry-after", "0".to_owned()));
            Answer::Status(429, h)
        }
    }
}

/// 429s the quota-limited mock sends for `requests` sequential requests
/// under `strategy`; every request must still succeed.
async fn upstream_429s(strategy: &str, requests: usize) -> usize {
    // k1 has room for five requests of 200 tokens and a bit: the gateway's
    // estimate for these requests (about 40 tokens) still fits what is
    // left, so only a strategy that weighs the readings avoids it.
    let up = KeyedMock::start(token_quota(
        &[("k1", 1100), ("k2", 10_000_000), ("k3", 10_000_000)],
        200,
    ))
    .await;
    let gw = Gateway::start(&config(
        "",
        &[client_yaml(
            "c",
            &up.url(),
            &["k1", "k2", "k3"],
            &format!("key_strategy: {strategy}\nmodel_match: {{ type: exact, value: [m] }}"),
        )],
    ))
    .await;
    for _ in 0..requests {
        let r = post(
            &gw.url("/v1/chat/completions"),
            json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    up.count_status(429)
}

#[tokio::test]
async fn headroom_cuts_the_429s_of_a_quota_limited_upstream_by_nine_tenths() {
    let round_robin = upstream_429s("round_robin", 150).await;
    let headroom = upstream_429s("headroom", 150).await;
    eprintln!("429s over 150 requests: round_robin {round_robin}, headroom {headroom}");
    assert!(
        round_robin >= 30,
        "the baseline must hit the limit: {round_robin}"
    );
    assert!(
        headroom * 10 <= round_robin,
        "headroom {headroom} vs round_robin {round_robin}"
    );
}

#[tokio::test]
async fn a_key_without_requests_left_is_skipped_until_its_reset_and_shown() {
    let up = KeyedMock::start(|key, _| {
        let left = if key == "k1" { "0" } else { "500" };
        Answer::Ok(vec![
            ("x-ratelimit-remaining-requests", left.to_owned()),
            ("x-ratelimit-reset-requests", "6m0s".to_owned()),
            ("x-ratelimit-remaining-tokens", "90000".to_owned()),
            ("x-ratelimit-reset-tokens", "120ms".to_owned()),
        ])
    })
    .await;
    let gw = Gateway::start(&config(
        "",
        &[client_yaml(
            "c",
            &up.url(),
            &["k1", "k2"],
            "model_match: { type: exact, value: [m] }",
        )],
    ))
    .await;
    for _ in 0..20 {
        assert_eq!(gw.chat("m").await.status, 200);
    }
    let keys = up.keys();
    assert_eq!(
        keys.iter().filter(|k| *k == "k1").count(),
        1,
        "k1 is asked once, then skipped: {keys:?}"
    );
    let s = status(&gw).await;
    let k1 = key_status(&s, "c", 0);
    assert_eq!(k1["healthy"], true, "skipped, not cooling");
    assert_eq!(k1["failures"], 0, "skipping is no failure");
    assert_eq!(k1["quota"]["remaining_requests"], 0);
    let reset = humantime::parse_rfc3339(k1["quota"]["reset_requests"].as_str().unwrap()).unwrap();
    let left = reset
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(300) && left <= Duration::from_secs(360),
        "{left:?}"
    );
    let m = metrics(&gw).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("gptbalance_key_remaining_requests{")
                && l.contains("client=\"c\"")
                && l.ends_with(" 0")),
        "{m}"
    );
    assert!(m.contains("gptbalance_key_remaining_tokens{"), "{m}");
}

#[tokio::test]
async fn when_every_key_is_short_requests_go_out_as_if_nothing_was_read() {
    // Both keys say they have nothing left (and, with max_tokens absent,
    // the request reserves more than the tokens shown), yet the upstream
    // answers: the reading is only a hint.
    let up = KeyedMock::start(|_, _| {
        Answer::Ok(vec![
            ("anthropic-ratelimit-requests-remaining", "0".to_owned()),
            (
                "anthropic-ratelimit-requests-reset",
                humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(60))
                    .to_string(),
            ),
            ("anthropic-ratelimit-tokens-remaining", "10".to_owned()),
            (
                "anthropic-ratelimit-tokens-reset",
                humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(60))
                    .to_string(),
            ),
        ])
    })
    .await;
    let gw = Gateway::start(&config(
        "",
        &[client_yaml(
            "c",
            &up.url(),
            &["k1", "k2"],
            "key_strategy: headroom\nmodel_match: { type: exact, value: [m] }",
        )],
    ))
    .await;
    for _ in 0..10 {
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let keys = up.keys();
    assert!(keys.contains(&"k1".to_owned()) && keys.contains(&"k2".to_owned()));
    let s = status(&gw).await;
    assert_eq!(key_status(&s, "c", 1)["quota"]["remaining_tokens"], 10);
}

#[tokio::test]
async fn bad_quota_headers_are_ignored_and_a_far_reset_is_capped_at_an_hour() {
    let huge = "9".repeat(10_000);
    let cases: Vec<Vec<(&'static str, String)>> = vec![
        vec![
            ("x-ratelimit-remaining-requests", huge.clone()),
            ("x-ratelimit-reset-requests", "1s".to_owned()),
        ],
        vec![
            ("x-ratelimit-remaining-requests", "-1".to_owned()),
            ("x-ratelimit-reset-requests", "1s".to_owned()),
        ],
        vec![
            ("x-ratelimit-remaining-tokens", "-20".to_owned()),
            ("x-ratelimit-reset-tokens", "1s".to_owned()),
        ],
        vec![
            ("x-ratelimit-remaining-requests", "plenty".to_owned()),
            ("x-ratelimit-reset-requests", "1s".to_owned()),
        ],
        vec![
            ("x-ratelimit-remaining-requests", "0".to_owned()),
            ("x-ratelimit-reset-requests", "2 days".to_owned()),
        ],
        vec![
            ("x-ratelimit-remaining-tokens", "0".to_owned()),
            ("x-ratelimit-reset-tokens", huge.clone()),
        ],
        vec![
            ("anthropic-ratelimit-requests-remaining", "0".to_owned()),
            (
                "anthropic-ratelimit-requests-reset",
                "next tuesday".to_owned(),
            ),
        ],
    ];
    let n = cases.len();
    let script = Mutex::new(cases.into_iter());
    let up =
        KeyedMock::start(move |_, _| Answer::Ok(script.lock().unwrap().next().unwrap_or_default()))
            .await;
    let gw = Gateway::start(&config(
        "",
        &[client_yaml(
            "c",
            &up.url(),
            &["k1"],
            "model_match: { type: exact, value: [m] }",
        )],
    ))
    .await;
    for i in 0..n {
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200, "case {i}: {}", r.text());
        let s = status(&gw).await;
        assert_eq!(key_status(&s, "c", 0)["quota"], Value::Null, "case {i}");
    }
    // A reset far in the future is held to an hour.
    let up = KeyedMock::start(|_, _| {
        Answer::Ok(vec![
            ("x-ratelimit-remaining-requests", "0".to_owned()),
            ("x-ratelimit-reset-requests", "1000h".to_owned()),
        ])
    })
    .await;
    let gw = Gateway::start(&config(
        "",
        &[client_yaml(
            "c",
            &up.url(),
            &["k1"],
            "model_match: { type: exact, value: [m] }",
        )],
    ))
    .await;
    assert_eq!(gw.chat("m").await.status, 200);
    let s = status(&gw).await;
    let reset = key_status(&s, "c", 0)["quota"]["reset_requests"]
        .as_str()
        .unwrap()
        .to_owned();
    let reset = humantime::parse_rfc3339(&reset).unwrap();
    let cap = std::time::SystemTime::now() + Duration::from_secs(3601);
    assert!(reset <= cap, "{reset:?}");
    // The only key is out of requests: it is still used (nothing else is left).
    assert_eq!(gw.chat("m").await.status, 200);
}

const TEN_KEYS: [&str; 10] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];

async fn affinity_gateway(up: &KeyedMock, routing: &str, client_extra: &str) -> Gateway {
    Gateway::start(&config(
        routing,
        &[client_yaml(
            "c",
            &up.url(),
            &TEN_KEYS,
            &format!("{client_extra}model_match: {{ type: exact, value: [m] }}"),
        )],
    ))
    .await
}

async fn chat_with_session(gw: &Gateway, session: &str) -> u16 {
    post_with(
        &gw.url("/v1/chat/completions"),
        chat("m"),
        &[("x-session-id", session)],
    )
    .await
    .status
}

#[tokio::test]
async fn affinity_keeps_a_session_on_one_key_and_spreads_sessions_evenly() {
    let up = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let gw = affinity_gateway(&up, "  affinity: { from: \"header:x-session-id\" }\n", "").await;
    for _ in 0..1000 {
        assert_eq!(chat_with_session(&gw, "conversation-42").await, 200);
    }
    let keys = up.keys();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for k in &keys {
        *per_key.entry(k.as_str()).or_default() += 1;
    }
    let top = per_key.values().max().copied().unwrap_or(0);
    eprintln!("one session, 1000 requests: {top} on its key, {per_key:?}");
    assert!(top >= 950, "{per_key:?}");

    // Many sessions: each key gets its share within ±30 %.
    let before = keys.len();
    let sessions = 2000;
    for i in 0..sessions {
        assert_eq!(chat_with_session(&gw, &format!("session-{i}")).await, 200);
    }
    let mut spread: HashMap<String, usize> = HashMap::new();
    for k in &up.keys()[before..] {
        *spread.entry(k.clone()).or_default() += 1;
    }
    let even = sessions as f64 / 10.0;
    let worst = spread
        .values()
        .map(|&n| (n as f64 - even).abs() / even)
        .fold(0.0, f64::max);
    eprintln!(
        "{sessions} sessions over 10 keys: {spread:?}, worst {:.1} % off even",
        worst * 100.0
    );
    assert_eq!(spread.len(), 10, "{spread:?}");
    assert!(worst <= 0.30, "{spread:?}");

    let m = metrics(&gw).await;
    assert!(
        m.contains(&format!(
            "gptbalance_affinity_requests_total{{result=\"hit\"}} {}",
            1000 + sessions
        )),
        "{m}"
    );
}

#[tokio::test]
async fn cooling_a_key_moves_only_its_own_sessions() {
    let refused = Arc::new(Mutex::new(None::<String>));
    let r2 = refused.clone();
    let up = KeyedMock::start(move |key, _| {
        if r2.lock().unwrap().as_deref() == Some(key) {
            Answer::Status(401, vec![])
        } else {
            Answer::Ok(vec![])
        }
    })
    .await;
    let gw = affinity_gateway(&up, "  affinity: { from: \"header:x-session-id\" }\n", "").await;
    let sessions: Vec<String> = (0..200).map(|i| format!("s-{i}")).collect();
    let mut home = Vec::new();
    for s in &sessions {
        chat_with_session(&gw, s).await;
        home.push(up.keys().last().unwrap().clone());
    }
    // The key of the first session is refused from now on: it cools down.
    let gone = home[0].clone();
    *refused.lock().unwrap() = Some(gone.clone());
    let mut moved = 0;
    for (s, was) in sessions.iter().zip(&home) {
        assert_eq!(chat_with_session(&gw, s).await, 200);
        let now = up.keys().last().unwrap().clone();
        if *was == gone {
            assert_ne!(now, gone);
            moved += 1;
        } else {
            assert_eq!(&now, was, "session {s} moved though its key is healthy");
        }
    }
    assert!(moved > 0);
}

#[tokio::test]
async fn affinity_takes_a_ten_kilobyte_value_a_missing_one_and_body_fields() {
    let up = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let gw = affinity_gateway(&up, "  affinity: { from: \"header:x-session-id\" }\n", "").await;
    let big = "s".repeat(10 * 1024);
    for _ in 0..20 {
        assert_eq!(chat_with_session(&gw, &big).await, 200);
    }
    let keys = up.keys();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    // Without the header, requests route as usual: keys rotate.
    for _ in 0..20 {
        assert_eq!(gw.chat("m").await.status, 200);
    }
    let rotated: std::collections::HashSet<String> = up.keys()[20..].iter().cloned().collect();
    assert!(rotated.len() >= 5, "{rotated:?}");
    let m = metrics(&gw).await;
    assert!(
        m.contains("gptbalance_affinity_requests_total{result=\"none\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("gptbalance_affinity_requests_total{result=\"hit\"} 20"),
        "{m}"
    );

    // Per client, from the body's `user`.
    let up = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let gw = affinity_gateway(&up, "", "affinity: { from: \"body:user\" }\n").await;
    for _ in 0..30 {
        let r = post(
            &gw.url("/v1/chat/completions"),
            json!({"model": "m", "user": "alice", "messages": []}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let keys = up.keys();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");

    // From `prompt_cache_key`, and from the caller's name: one key each.
    let up = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let gw = affinity_gateway(&up, "", "affinity: { from: \"body:prompt_cache_key\" }\n").await;
    for _ in 0..30 {
        let r = post(
            &gw.url("/v1/chat/completions"),
            json!({"model": "m", "prompt_cache_key": "conv-9", "messages": []}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let keys = up.keys();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let up = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let yaml = config(
        "  affinity: { from: caller }\n",
        &[client_yaml(
            "c",
            &up.url(),
            &TEN_KEYS,
            "model_match: { type: exact, value: [m] }",
        )],
    )
    .replace(
        "server:\n",
        "server:\n  auth_tokens: [{ name: app, token: tok-app }]\n",
    );
    let gw = Gateway::start(&yaml).await;
    for _ in 0..30 {
        let r = post_with(
            &gw.url("/v1/chat/completions"),
            chat("m"),
            &[("authorization", "Bearer tok-app")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let keys = up.keys();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
}

/// `gptbalance` run in `dir`: exit code and stdout.
fn gptbalance(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gptbalance"))
        .args(args)
        .current_dir(dir)
        .env_remove("GPTBALANCE_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn validate_config_rejects_an_unknown_affinity_form() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "routing:\n  affinity: { from: \"cookie:sid\" }\nopenai_clients:\n  - name: a\n    base_url: http://h\n    api_key: k\n    affinity: { from: \"header:bad header\" }\n    first_token_timeout: 0s\n    model_match: { type: exact, value: [m] }\n";
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let (code, out) = gptbalance(&["validate-config", "--config", "c.yaml"], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("c.yaml:2:") && l.contains("unknown form `cookie:sid`")),
        "{out}"
    );
    assert!(
        out.contains("`bad header` is not a valid header name"),
        "{out}"
    );
    assert!(
        out.contains("first_token_timeout must be more than 0"),
        "{out}"
    );
}

#[test]
fn route_explains_the_selection_settings() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "routing:\n  deadline: 45s\n  affinity: { from: \"header:x-session-id\" }\nopenai_clients:\n  - name: a\n    base_url: http://h\n    api_keys: [k1, k2]\n    key_strategy: headroom\n    balance: latency\n    first_token_timeout: 20s\n    model_match: { type: exact, value: [m] }\n";
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let (code, out) = gptbalance(&["route", "--config", "c.yaml", "m"], dir.path());
    assert_eq!(code, 0, "{out}");
    for want in [
        "[headroom]",
        "affinity from header:x-session-id",
        "balance: latency",
        "first_token_timeout 20s",
        "quota: no reading yet",
        "deadline: 45s",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[tokio::test]
async fn the_deadline_bounds_every_attempt_and_fallback_together() {
    let a = KeyedMock::start(|_, _| Answer::Hang).await;
    let b = KeyedMock::start(|_, _| Answer::Hang).await;
    let clients = [
        client_yaml(
            "a",
            &a.url(),
            &["k1", "k2"],
            "priority: 1\nmodel_match: { type: exact, value: [m] }",
        ),
        client_yaml(
            "b",
            &b.url(),
            &["k3"],
            "priority: 2\nmodel_match: { type: exact, value: [m] }",
        ),
    ];
    let deadline = Duration::from_millis(800);
    let gw = Gateway::start(&config(
        "  deadline: 800ms\n  request_timeout: 30s\n",
        &clients,
    ))
    .await;
    let started = Instant::now();
    let r = gw.chat("m").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert!(r.text().contains("routing.deadline"), "{}", r.text());
    assert!(
        took <= deadline + Duration::from_millis(500),
        "answered after {took:?}"
    );
    assert!(took >= deadline, "{took:?}");

    // Three candidates that each time out: the deadline, not the sum of
    // their timeouts, ends the request.
    let gw = Gateway::start(&config(
        "  deadline: 800ms\n  request_timeout: 500ms\n",
        &clients,
    ))
    .await;
    let started = Instant::now();
    let r = gw.chat("m").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took <= deadline + Duration::from_millis(500), "{took:?}");
    assert!(a.keys().len() + b.keys().len() >= 2);
}

#[tokio::test]
async fn a_stream_without_its_first_byte_fails_over_after_first_token_timeout() {
    let silent = KeyedMock::start(|_, _| Answer::Silent).await;
    let good = MockUpstream::start("good").await;
    good.set_default(Reply::Sse {
        events: vec![chat_chunk("hello"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&config(
        "  request_timeout: 30s\n",
        &[
            client_yaml(
                "silent",
                &silent.url(),
                &["k"],
                "priority: 1\nfirst_token_timeout: 300ms\nmodel_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "good",
                &good.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
    ))
    .await;
    let mut resp = gw.stream("m").await;
    assert_eq!(resp.status(), 200);
    let text = read_all(resp.body_mut()).await.unwrap();
    assert!(text.contains("hello"), "{text}");
    assert_eq!(silent.keys().len(), 1);
    let m = metrics(&gw).await;
    assert!(
        m.contains("gptbalance_upstream_attempts_total{client=\"silent\",result=\"first_token_timeout\"} 1"),
        "{m}"
    );

    // Alone, it ends in 504.
    let gw = Gateway::start(&config(
        "  request_timeout: 30s\n  first_token_timeout: 300ms\n",
        &[client_yaml(
            "silent",
            &silent.url(),
            &["k"],
            "model_match: { type: exact, value: [m] }",
        )],
    ))
    .await;
    let r = post(
        &gw.url("/v1/chat/completions"),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("first_token_timeout"), "{}", r.text());
}

#[tokio::test]
async fn latency_balance_sends_most_requests_to_the_faster_client() {
    let slow_count = Arc::new(AtomicUsize::new(0));
    let sc = slow_count.clone();
    let slow = KeyedMock::start(move |_, _| {
        sc.fetch_add(1, Ordering::SeqCst);
        Answer::Delay(Duration::from_millis(150))
    })
    .await;
    let fast = KeyedMock::start(|_, _| Answer::Ok(vec![])).await;
    let gw = Gateway::start(&config(
        "  balance: latency\n",
        &[
            client_yaml(
                "slow",
                &slow.url(),
                &["k"],
                "model_match: { type: exact, value: [m] }",
            ),
            client_yaml(
                "fast",
                &fast.url(),
                &["k"],
                "model_match: { type: exact, value: [m] }",
            ),
        ],
    ))
    .await;
    for _ in 0..100 {
        assert_eq!(gw.chat("m").await.status, 200);
    }
    let slow_n = slow_count.load(Ordering::SeqCst);
    eprintln!(
        "balance: latency, 100 requests: slow {slow_n}, fast {}",
        fast.keys().len()
    );
    assert!(slow_n <= 25, "slow {slow_n}");
    let s = status(&gw).await;
    let ttfb = |name: &str| {
        s["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["ttfb_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(ttfb("slow") >= 100 && ttfb("fast") < 100, "{s}");
}
