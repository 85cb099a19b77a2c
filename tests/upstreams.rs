//! Upstream kinds and secrets: `api: anthropic` clients behind
//! `POST /v1/messages`, `auth: bearer | api-key | none`, and keys and
//! tokens read from files (re-read on reload).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn month() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7].to_owned()
}

/// `(endpoint, client, prompt, cached, completion, total, error)` of every row.
type Row = (
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

fn rows(dir: &Path) -> Vec<Row> {
    let db =
        rusqlite::Connection::open(dir.join(format!("usage/usage-{}.sqlite", month()))).unwrap();
    let mut stmt = db
        .prepare("SELECT endpoint, client, prompt_tokens, cached_tokens, completion_tokens, total_tokens, error FROM requests ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn messages(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// An `openai` client `o` and an `anthropic` client `a`, both serving `m`
/// exactly, and `gpt-only` served by `o` alone; callers need a token.
fn both_kinds(openai: &MockUpstream, anthropic: &MockUpstream) -> String {
    format!(
        "server:\n  auth_tokens: [\"tok\"]\nusage:\n  dir: ./usage\nopenai_clients:\n{}{}",
        client_yaml(
            "o",
            &openai.url(),
            &["ko"],
            "model_match: { type: exact, value: [m, gpt-only] }"
        ),
        client_yaml(
            "a",
            &anthropic.url(),
            &["ka1", "ka2"],
            "api: anthropic\nkey_strategy: least_used\nmodel_match: { type: exact, value: [m] }"
        ),
    )
}

#[tokio::test]
async fn messages_go_to_anthropic_clients_with_x_api_key_and_usage_counts_the_cache() {
    let openai = MockUpstream::start("o").await;
    let anthropic = MockUpstream::start("a").await;
    anthropic.push(Reply::Json(200, anthropic_message("m", "hello")));
    let gw = Gateway::start(&both_kinds(&openai, &anthropic)).await;

    // The caller authenticates the Anthropic SDK's way, with x-api-key,
    // and sends its own anthropic-version.
    let r = post_with(
        &gw.url("/v1/messages"),
        messages("m", false),
        &[("x-api-key", "tok"), ("anthropic-version", "2099-01-01")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), anthropic_message("m", "hello"));
    // OpenAI endpoints still go to the openai client, and x-api-key is no
    // token there.
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("m"),
        &[("authorization", "Bearer tok")],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("m"),
        &[("x-api-key", "tok")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");

    let up = anthropic.requests();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].uri, "/v1/messages");
    assert!(["ka1", "ka2"].contains(&up[0].header("x-api-key").as_str()));
    assert_eq!(up[0].header("anthropic-version"), "2023-06-01");
    assert_eq!(up[0].auth(), "");
    assert_eq!(up[0].headers.get_all("anthropic-version").iter().count(), 1);
    assert_eq!(openai.requests().len(), 1);
    assert_eq!(openai.requests()[0].auth(), "Bearer ko");
    assert_eq!(openai.requests()[0].header("x-api-key"), "");

    let dir = gw.stop().await;
    let rows = rows(dir.path());
    // The refused request never reached routing: no row.
    assert_eq!(rows.len(), 2);
    let (endpoint, client, prompt, cached, completion, total, error) = &rows[0];
    assert_eq!(endpoint, "messages");
    assert_eq!(client.as_deref(), Some("a"));
    assert_eq!(
        (*prompt, *cached, *completion, *total),
        (Some(16), Some(4), Some(6), Some(22))
    );
    assert_eq!(error, &None);
    assert_eq!(rows[1].1.as_deref(), Some("o"));
}

#[tokio::test]
async fn an_anthropic_stream_is_relayed_byte_for_byte_and_its_usage_read() {
    let openai = MockUpstream::start("o").await;
    let anthropic = MockUpstream::start("a").await;
    let events = anthropic_stream("m", &["Hel", "lo"]);
    anthropic.push(Reply::Sse {
        events: events.clone(),
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&both_kinds(&openai, &anthropic)).await;
    let req = post_req(
        &gw.url("/v1/messages"),
        messages("m", true).to_string(),
        &[("authorization", "Bearer tok")],
    );
    let mut resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = read_all(resp.body_mut()).await.unwrap();
    assert_eq!(body, events.concat());
    // No stream_options injected into an Anthropic request.
    let sent = anthropic.requests()[0].json();
    assert_eq!(sent, messages("m", true));

    let dir = gw.stop().await;
    let rows = rows(dir.path());
    assert_eq!(
        (rows[0].2, rows[0].3, rows[0].4, rows[0].5),
        (Some(13), Some(3), Some(5), Some(18))
    );
}

#[tokio::test]
async fn anthropic_429_cools_the_key_down_and_the_next_key_answers() {
    let openai = MockUpstream::start("o").await;
    let anthropic = MockUpstream::start("a").await;
    anthropic.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "30".into())],
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
            .to_string(),
    ));
    anthropic.push(Reply::Json(200, anthropic_message("m", "second key")));
    let gw = Gateway::start(&both_kinds(&openai, &anthropic)).await;
    let r = post_with(
        &gw.url("/v1/messages"),
        messages("m", false),
        &[("x-api-key", "tok")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let keys: Vec<String> = anthropic
        .requests()
        .iter()
        .map(|r| r.header("x-api-key"))
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1]);
    // The first key now cools for its Retry-After: the next request goes
    // straight to the other one.
    let r = post_with(
        &gw.url("/v1/messages"),
        messages("m", false),
        &[("x-api-key", "tok")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(anthropic.requests()[2].header("x-api-key"), keys[1]);
}

#[tokio::test]
async fn gateway_errors_on_messages_take_anthropics_shape_and_formats_never_mix() {
    let openai = MockUpstream::start("o").await;
    let anthropic = MockUpstream::start("a").await;
    let gw = Gateway::start(&both_kinds(&openai, &anthropic)).await;
    let auth = [("x-api-key", "tok")];

    // A model only openai clients serve.
    let r = post_with(&gw.url("/v1/messages"), messages("gpt-only", false), &auth).await;
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no `anthropic` client serves model `gpt-only`"),
        "{msg}"
    );
    assert!(v.get("code").is_none() && v["error"].get("code").is_none());

    // Pinned to an openai client: 400 naming the mismatch, both ways.
    let r = post_with(&gw.url("/o/v1/messages"), messages("m", false), &auth).await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("`o`") && msg.contains("`openai`") && msg.contains("`anthropic`"),
        "{msg}"
    );
    assert_eq!(r.json()["type"], "error");
    let r = post_with(
        &gw.url("/a/v1/chat/completions"),
        chat("m"),
        &[("authorization", "Bearer tok")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_request_error");

    // A wrong or missing token, and a body without a model.
    let r = post_with(
        &gw.url("/v1/messages"),
        messages("m", false),
        &[("x-api-key", "nope")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = post(&gw.url("/v1/messages"), messages("m", false)).await;
    assert_eq!(r.status, 401);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("x-api-key"), "{msg}");
    let r = post_with(&gw.url("/v1/messages"), json!({"max_tokens": 1}), &auth).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    // Elsewhere OpenAI's shape stays.
    let r = post_with(
        &gw.url("/v1/chat/completions"),
        chat("nothing"),
        &[("authorization", "Bearer tok")],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert!(openai.requests().is_empty() && anthropic.requests().is_empty());
}

#[tokio::test]
async fn auth_styles_send_the_key_where_the_client_wants_it() {
    let azure = MockUpstream::start("azure").await;
    let open = MockUpstream::start("open").await;
    let bearer_anthropic = MockUpstream::start("ba").await;
    let yaml = format!(
        "server:\n  admin_token: adm\nusage:\n  enabled: false\nopenai_clients:\n{}{}  - name: open\n    base_url: \"{}\"\n    auth: none\n    model_match: {{ type: exact, value: [local] }}\n{}",
        client_yaml("azure", &azure.url(), &["az-key"], "auth: api-key\nmodel_match: { type: exact, value: [az] }"),
        "",
        open.url(),
        client_yaml("ba", &bearer_anthropic.url(), &["bk"], "api: anthropic\nauth: bearer\nanthropic_version: \"2024-10-22\"\nmodel_match: { type: exact, value: [claude] }"),
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(
        post(&gw.url("/v1/chat/completions"), chat("az"))
            .await
            .status,
        200
    );
    assert_eq!(
        post(&gw.url("/v1/chat/completions"), chat("local"))
            .await
            .status,
        200
    );
    bearer_anthropic.push(Reply::Json(200, anthropic_message("claude", "x")));
    let r = post(&gw.url("/v1/messages"), messages("claude", false)).await;
    assert_eq!(r.status, 200);

    let az = &azure.requests()[0];
    assert_eq!(az.header("api-key"), "az-key");
    assert_eq!(az.auth(), "");
    let o = &open.requests()[0];
    assert_eq!(
        (o.auth(), o.header("api-key"), o.header("x-api-key")),
        Default::default()
    );
    let b = &bearer_anthropic.requests()[0];
    assert_eq!(b.auth(), "Bearer bk");
    assert_eq!(b.header("x-api-key"), "");
    assert_eq!(b.header("anthropic-version"), "2024-10-22");

    // The effective config says how each client is reached, and shows no
    // key for `auth: none`.
    let cfg = get(&gw.url("/admin/config"), &[("authorization", "Bearer adm")])
        .await
        .json();
    let clients = cfg["clients"].as_array().unwrap();
    let shown: Vec<(&str, &str, usize)> = clients
        .iter()
        .map(|c| {
            (
                c["api"].as_str().unwrap(),
                c["auth"].as_str().unwrap(),
                c["keys"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("openai", "api-key", 1),
            ("openai", "none", 0),
            ("anthropic", "bearer", 1)
        ]
    );
    assert_eq!(clients[2]["anthropic_version"], "2024-10-22");
}

fn write_secret(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn secrets_come_from_files_and_are_read_again_on_reload() {
    let up = MockUpstream::start("up").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path().display().to_string();
    write_secret(secrets.path(), "key", "file-key\n");
    write_secret(secrets.path(), "keys", "pool-1\n\n# a comment\npool-2\n");
    write_secret(secrets.path(), "caller", "caller-token\n");
    write_secret(secrets.path(), "app", "app-token");
    write_secret(secrets.path(), "admin", "admin-token\n");
    write_secret(secrets.path(), "org", "org-1\n");
    let yaml = format!(
        "server:\n  auth_tokens:\n    - {{ token_file: {s}/app }}\n  admin_token_file: {s}/admin\nusage:\n  enabled: false\ncallers:\n  - name: batch\n    token_file: {s}/caller\nopenai_clients:\n  - name: one\n    base_url: \"{url}\"\n    api_key_file: {s}/key\n    headers: {{ x-org: \"${{file:{s}/org}}\" }}\n    model_match: {{ type: exact, value: [one] }}\n  - name: pool\n    base_url: \"{url}\"\n    api_keys_file: {s}/keys\n    key_strategy: round_robin\n    model_match: {{ type: exact, value: [pool] }}\n",
        url = up.url()
    );
    let gw = Gateway::start(&yaml).await;
    let as_app = [("authorization", "Bearer app-token")];
    let as_batch = [("authorization", "Bearer caller-token")];
    assert_eq!(
        post_with(&gw.url("/v1/chat/completions"), chat("one"), &as_app)
            .await
            .status,
        200
    );
    for _ in 0..2 {
        let r = post_with(&gw.url("/v1/chat/completions"), chat("pool"), &as_batch).await;
        assert_eq!(r.status, 200);
    }
    let reqs = up.requests();
    assert_eq!(reqs[0].auth(), "Bearer file-key");
    assert_eq!(reqs[0].header("x-org"), "org-1");
    let mut pool: Vec<String> = reqs[1..].iter().map(|r| r.auth()).collect();
    pool.sort();
    assert_eq!(pool, ["Bearer pool-1", "Bearer pool-2"]);
    let status = get(
        &gw.url("/admin/status"),
        &[("authorization", "Bearer admin-token")],
    )
    .await;
    assert_eq!(status.status, 200);

    // A changed file is read on reload.
    write_secret(secrets.path(), "key", "rotated-key\n");
    let r = send(post_req(
        &gw.url("/admin/reload"),
        String::new(),
        &[("authorization", "Bearer admin-token")],
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["last_reload"]["ok"], true);
    post_with(&gw.url("/v1/chat/completions"), chat("one"), &as_app).await;
    assert_eq!(up.requests().last().unwrap().auth(), "Bearer rotated-key");

    // A deleted file: the reload is refused with the path, the running
    // table is kept, and no secret shows in the answer.
    std::fs::remove_file(secrets.path().join("key")).unwrap();
    let r = send(post_req(
        &gw.url("/admin/reload"),
        String::new(),
        &[("authorization", "Bearer admin-token")],
    ))
    .await;
    let text = r.text();
    assert_eq!(r.json()["last_reload"]["ok"], false, "{text}");
    assert!(text.contains(&format!("{s}/key")), "{text}");
    assert!(text.contains("api_key_file"), "{text}");
    for secret in [
        "rotated-key",
        "pool-1",
        "caller-token",
        "admin-token",
        "org-1",
    ] {
        assert!(!text.contains(secret), "{text}");
    }
    post_with(&gw.url("/v1/chat/completions"), chat("one"), &as_app).await;
    assert_eq!(up.requests().last().unwrap().auth(), "Bearer rotated-key");
}

#[tokio::test]
async fn a_secret_file_changed_alone_is_read_again_without_being_asked() {
    let up = MockUpstream::start("up").await;
    // The secrets live outside the config file's directory, as with
    // systemd credentials or a mounted secret volume.
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path().display().to_string();
    write_secret(secrets.path(), "key", "first-key\n");
    let yaml = format!(
        "usage:\n  enabled: false\nopenai_clients:\n  - name: one\n    base_url: \"{url}\"\n    api_key_file: {s}/key\n    model_match: {{ type: exact, value: [one] }}\n",
        url = up.url()
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(
        post(&gw.url("/v1/chat/completions"), chat("one"))
            .await
            .status,
        200
    );
    assert_eq!(up.requests()[0].auth(), "Bearer first-key");

    // Rotated in place: no reload asked for, the config file untouched.
    write_secret(secrets.path(), "key", "second-key\n");
    assert!(
        gw.wait_generation(2).await,
        "the secret file's change reloaded"
    );
    assert_eq!(
        post(&gw.url("/v1/chat/completions"), chat("one"))
            .await
            .status,
        200
    );
    assert_eq!(up.requests().last().unwrap().auth(), "Bearer second-key");

    // Swapped by rename, as secret managers and editors do.
    write_secret(secrets.path(), "key.new", "third-key\n");
    std::fs::rename(secrets.path().join("key.new"), secrets.path().join("key")).unwrap();
    assert!(
        gw.wait_generation(3).await,
        "the renamed-in secret reloaded"
    );
    assert_eq!(
        post(&gw.url("/v1/chat/completions"), chat("one"))
            .await
            .status,
        200
    );
    assert_eq!(up.requests().last().unwrap().auth(), "Bearer third-key");

    // Another file in that directory is not followed.
    let g = gw.generation();
    write_secret(secrets.path(), "unrelated", "x");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.generation(), g, "an unrelated file reloads nothing");
}

fn validate(config: &Path, creds: Option<&Path>) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gptbalance"));
    cmd.args(["validate-config", "--config"]).arg(config);
    cmd.env_remove("CREDENTIALS_DIRECTORY");
    if let Some(c) = creds {
        cmd.env("CREDENTIALS_DIRECTORY", c);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn validate_config_reads_secret_files_from_the_credentials_directory() {
    use std::os::unix::fs::PermissionsExt;
    let conf = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    let config = conf.path().join("config.yaml");
    std::fs::write(
        &config,
        "openai_clients:\n  - name: c\n    base_url: \"http://127.0.0.1:9/v1\"\n    api_key_file: openai-key\n    model_match: { type: exact, value: [m] }\n",
    )
    .unwrap();

    // Relative to $CREDENTIALS_DIRECTORY when set, else to the config's directory.
    let (code, out) = validate(&config, Some(creds.path()));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&creds.path().join("openai-key").display().to_string()),
        "{out}"
    );
    assert!(out.contains("config.yaml:4:"), "{out}");
    write_secret(creds.path(), "openai-key", "sk-in-credentials\n");
    let (code, out) = validate(&config, Some(creds.path()));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("sk-in-credentials"), "{out}");
    let (code, _) = validate(&config, None);
    assert_eq!(code, 1);

    // Readable by others: a warning, not an error.
    write_secret(conf.path(), "openai-key", "sk-local");
    std::fs::set_permissions(
        conf.path().join("openai-key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, out) = validate(&config, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("readable by group or others"), "{out}");
    assert!(!out.contains("sk-local"), "{out}");

    // Several lines where one key is expected: an error that shows none of them.
    write_secret(conf.path(), "openai-key", "sk-a\nsk-b\n");
    let (code, out) = validate(&config, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("several lines"), "{out}");
    assert!(!out.contains("sk-a") && !out.contains("sk-b"), "{out}");

    // auth: none needs no key, and says so of keys it would never send.
    std::fs::write(
        &config,
        "openai_clients:\n  - name: local\n    base_url: \"http://127.0.0.1:9/v1\"\n    auth: none\n    model_match: { type: exact, value: [m] }\n  - name: keyed\n    base_url: \"http://127.0.0.1:9/v1\"\n    auth: none\n    api_key: unused\n    model_match: { type: exact, value: [n] }\n",
    )
    .unwrap();
    let (code, out) = validate(&config, None);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("client `keyed` has auth: none, so its keys are never sent"),
        "{out}"
    );
    assert!(!out.contains("client `local`"), "{out}");
}

/// The official Anthropic Python SDK against the gateway and a mock
/// Anthropic upstream, when it is installed (`.ci/run` installs it and
/// sets GPTBALANCE_REQUIRE_SDK=1).
#[tokio::test]
async fn the_official_anthropic_python_sdk_works_end_to_end() {
    let has_sdk = std::process::Command::new("python3")
        .args(["-c", "import anthropic"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            std::env::var_os("GPTBALANCE_REQUIRE_SDK").is_none(),
            "the anthropic package is required"
        );
        eprintln!("skipped: python3 has no `anthropic` package (pip install anthropic)");
        return;
    }
    let openai = MockUpstream::start("o").await;
    let up = MockUpstream::start("a").await;
    up.push(Reply::Json(
        200,
        anthropic_message("claude-sonnet-4-5", "hello from the messages api"),
    ));
    for _ in 0..2 {
        up.push(Reply::Sse {
            events: anthropic_stream("claude-sonnet-4-5", &["Hello", " there"]),
            gate: None,
            abort_at_end: false,
        });
    }
    let gw = Gateway::start(&format!(
        "server:\n  auth_tokens: [\"sdk-token\"]\nusage:\n  dir: ./usage\nopenai_clients:\n{}{}",
        client_yaml(
            "o",
            &openai.url(),
            &["ko"],
            "model_match: { type: exact, value: [gpt-4o] }"
        ),
        client_yaml(
            "claude",
            &up.url(),
            &["sk-ant"],
            "api: anthropic\nmodel_match: { type: keyword, value: [claude-] }"
        ),
    ))
    .await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/anthropic_sdk_check.py"
    );
    // The SDK appends /v1/messages itself.
    let base = gw.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
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
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.uri, "/v1/messages");
        assert_eq!(r.header("x-api-key"), "sk-ant");
        assert_eq!(r.header("anthropic-version"), "2023-06-01");
        assert!(r.header("user-agent").starts_with("Anthropic/Python"));
    }
    assert!(openai.requests().is_empty());
    let dir = gw.stop().await;
    let rows = rows(dir.path());
    let served: Vec<_> = rows
        .iter()
        .filter(|r| r.1.as_deref() == Some("claude"))
        .collect();
    assert_eq!(served.len(), 3, "{rows:?}");
    assert_eq!(
        (served[0].2, served[0].3, served[0].4, served[0].5),
        (Some(16), Some(4), Some(6), Some(22))
    );
    for s in &served[1..] {
        assert_eq!((s.2, s.3, s.4, s.5), (Some(13), Some(3), Some(5), Some(18)));
    }
}

#[tokio::test]
async fn an_answer_in_the_other_format_passes_through_with_usage_unknown_and_noted() {
    let openai = MockUpstream::start("o").await;
    let anthropic = MockUpstream::start("a").await;
    // The anthropic client answers like OpenAI, then the openai client like
    // Anthropic, then a stream of OpenAI chunks reaches an Anthropic caller.
    anthropic.push(Reply::Ok);
    openai.push(Reply::Json(200, anthropic_message("m", "odd")));
    anthropic.push(Reply::Sse {
        events: vec![chat_chunk("x"), usage_chunk(2, 1), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&both_kinds(&openai, &anthropic)).await;
    let auth = [("authorization", "Bearer tok")];
    let r = post_with(&gw.url("/v1/messages"), messages("m", false), &auth).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");
    let r = post_with(&gw.url("/v1/chat/completions"), chat("m"), &auth).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), anthropic_message("m", "odd"));
    let req = post_req(
        &gw.url("/v1/messages"),
        messages("m", true).to_string(),
        &auth,
    );
    let mut resp = client().request(req).await.unwrap();
    let body = read_all(resp.body_mut()).await.unwrap();
    assert_eq!(
        body,
        format!("{}{}{}", chat_chunk("x"), usage_chunk(2, 1), DONE)
    );

    let dir = gw.stop().await;
    let rows = rows(dir.path());
    assert_eq!(rows.len(), 3);
    for (row, note) in rows.iter().zip([
        "upstream answered in OpenAI's format where Anthropic's was expected: usage unknown",
        "upstream answered in Anthropic's format where OpenAI's was expected: usage unknown",
        "upstream answered in OpenAI's format where Anthropic's was expected: usage unknown",
    ]) {
        assert_eq!((row.2, row.4, row.5), (None, None, None), "{row:?}");
        assert_eq!(row.6.as_deref(), Some(note));
    }
}
