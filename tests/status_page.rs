//! The status page and what feeds it: `/admin/ui` in a real browser,
//! `/admin/usage`, and the background probes of keys refused with 401/403.

mod common;

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
