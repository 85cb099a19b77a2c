//! The operator toolkit: check-keys, route, usage; the packaging files;
//! the README's config reference against the schema.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use gptbalance::usage::store;
use gptbalance::usage::UsageRecord;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("GPTBALANCE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run_async(args: Vec<String>, dir: std::path::PathBuf) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, &dir)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn check_keys_gives_each_key_its_verdict() {
    let good = MockUpstream::start("good").await;
    let bad = MockUpstream::start("bad").await;
    bad.set_default(Reply::Json(
        401,
        serde_json::json!({"error": {"message": "Incorrect API key provided: sk-bad"}}),
    ));
    let limited = MockUpstream::start("limited").await;
    limited.set_default(Reply::Json(429, serde_json::json!({})));
    let broken = MockUpstream::start("broken").await;
    broken.set_default(Reply::Json(500, serde_json::json!({})));
    let slow = MockUpstream::start("slow").await;
    slow.set_default(Reply::Hang);
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clients = [
        client_yaml(
            "good",
            &good.url(),
            &["sk-good-1", "sk-good-2"],
            "model_match: { type: exact, value: [a] }",
        ),
        client_yaml(
            "bad",
            &bad.url(),
            &["sk-bad"],
            "model_match: { type: exact, value: [b] }",
        ),
        client_yaml(
            "limited",
            &limited.url(),
            &["sk-limited"],
            "model_match: { type: exact, value: [c] }",
        ),
        client_yaml(
            "broken",
            &broken.url(),
            &["sk-broken"],
            "model_match: { type: exact, value: [d] }",
        ),
        client_yaml(
            "slow",
            &slow.url(),
            &["sk-slow"],
            "model_match: { type: exact, value: [e] }",
        ),
        client_yaml(
            "down",
            &format!("http://{down}/v1"),
            &["sk-down"],
            "model_match: { type: exact, value: [f] }",
        ),
    ];
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, format!("openai_clients:\n{}", clients.concat())).unwrap();
    let p = path.display().to_string();
    let (code, out, err) = run_async(
        vec![
            "check-keys".into(),
            "--config".into(),
            p.clone(),
            "--format".into(),
            "json".into(),
            "--timeout".into(),
            "500ms".into(),
        ],
        dir.path().into(),
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let probes: Vec<Value> = serde_json::from_str(&out).unwrap();
    let verdict = |client: &str| -> Vec<String> {
        probes
            .iter()
            .filter(|p| p["client"] == client)
            .map(|p| p["verdict"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(verdict("good"), ["ok", "ok"]);
    assert_eq!(verdict("bad"), ["invalid"]);
    assert_eq!(verdict("limited"), ["rate_limited"]);
    assert_eq!(verdict("broken"), ["upstream_error"]);
    assert_eq!(verdict("slow"), ["unreachable"]);
    assert_eq!(verdict("down"), ["unreachable"]);
    assert_eq!(
        probes.iter().find(|p| p["client"] == "bad").unwrap()["status"],
        401
    );
    assert!(!out.contains("sk-"), "no key in the output: {out}");
    let reqs = good.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs
        .iter()
        .all(|r| r.method == "GET" && r.uri == "/v1/models"));

    let (code, out, _) = run_async(
        vec![
            "check-keys".into(),
            "--config".into(),
            p.clone(),
            "--client".into(),
            "good".into(),
        ],
        dir.path().into(),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("CLIENT") && out.contains("2 of 2 keys ok"),
        "{out}"
    );
    assert!(!out.contains("sk-good"));
    let (code, _, _) = run_async(
        vec![
            "check-keys".into(),
            "--config".into(),
            p,
            "--client".into(),
            "nobody".into(),
        ],
        dir.path().into(),
    )
    .await;
    assert_eq!(code, 2);
}

#[test]
fn route_explains_candidates_weights_transforms_and_the_fallback_chain() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"routing:
  max_fallback_depth: 2
openai_clients:
  - { name: a, base_url: "http://h/v1", api_keys: [k1, k2], priority: 1, weight: 3, model_match: { type: keyword, value: [gpt] }, fallback: [mini] }
  - { name: b, base_url: "http://h/v1", api_key: k3, priority: 1, weight: 1, upstream_model: gpt-x, model_match: { type: regex, value: ["gpt-.*"] } }
  - { name: c, base_url: "http://h/v1", api_key: k4, priority: 5, model_match: { type: keyword, value: [gpt] } }
  - { name: m, base_url: "http://h/v1", api_key: k5, model_match: { type: exact, value: [mini] }, fallback: [deep] }
  - { name: d, base_url: "http://h/v1", api_key: k6, model_match: { type: exact, value: [deep] }, fallback: [last] }
  - { name: l, base_url: "http://h/v1", api_key: k7, model_match: { type: exact, value: [last] } }
"#;
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = run(&["route", "--config", p, "gpt-4o"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("priority 1:") && out.contains("priority 5:"),
        "{out}"
    );
    assert!(
        out.contains("a — weight 3 (75% of this tier), 2 key(s)"),
        "{out}"
    );
    assert!(out.contains("b — weight 1 (25% of this tier)"), "{out}");
    assert!(out.contains("sends model `gpt-x` upstream"), "{out}");
    // Each candidate says which of its values matched.
    let a = out.find("a — weight 3").unwrap();
    assert_eq!(
        out[a..].lines().nth(1),
        Some("        matched by keyword `gpt`"),
        "{out}"
    );
    let b = out.find("b — weight 1").unwrap();
    assert_eq!(
        out[b..].lines().nth(1),
        Some("        matched by regex `gpt-.*`"),
        "{out}"
    );
    let (_, exact, _) = run(&["route", "--config", p, "mini"], dir.path());
    assert!(
        exact.contains("        matched by exact `mini`\n"),
        "{exact}"
    );
    assert!(out.contains("-> mini (depth 1): m"), "{out}");
    assert!(out.contains("-> deep (depth 2): d"), "{out}");
    assert!(
        out.contains("-> last: not tried, max_fallback_depth 2 reached"),
        "{out}"
    );
    assert!(out.find("priority 1:").unwrap() < out.find("priority 5:").unwrap());
    assert!(
        !out.contains("k1") || out.contains("key-"),
        "keys appear only as ids"
    );

    let (code, out, _) = run(&["route", "--config", p, "minni"], dir.path());
    assert_eq!(code, 1);
    assert!(
        out.contains("no client serves model `minni`") && out.contains("did you mean `mini`?"),
        "{out}"
    );
}

fn record(
    client: &str,
    model: &str,
    caller: Option<&str>,
    status: u16,
    latency: u64,
    tokens: (u64, u64),
) -> UsageRecord {
    UsageRecord {
        ts: Some(humantime::parse_rfc3339("2026-03-10T12:00:00Z").unwrap()),
        request_id: format!("r-{client}-{latency}"),
        caller: caller.map(Into::into),
        endpoint: "chat/completions".into(),
        model: Some(model.into()),
        routed_model: Some(model.into()),
        client: Some(client.into()),
        key_id: Some(format!("key-{client}").into()),
        status,
        attempts: 1,
        latency_ms: latency,
        prompt_tokens: Some(tokens.0),
        completion_tokens: Some(tokens.1),
        total_tokens: Some(tokens.0 + tokens.1),
        ..Default::default()
    }
}

#[test]
fn usage_adds_up_several_instances_by_any_column_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut ca = store::UsageFile::open(&store::path_for(&a, "2026-03")).unwrap();
    let mut cb = store::UsageFile::open(&store::path_for(&b, "2026-03")).unwrap();
    let ra: Vec<UsageRecord> = (1..=10)
        .map(|i| record("openai", "gpt-4o", Some("app"), 200, i * 10, (10, 5)))
        .collect();
    let rb = [
        record("deepseek", "deepseek-chat", None, 502, 1000, (0, 0)),
        record("openai", "gpt-4o", Some("batch"), 200, 200, (1, 1)),
    ];
    ca.insert_batch(&ra.iter().collect::<Vec<_>>()).unwrap();
    cb.insert_batch(&rb.iter().collect::<Vec<_>>()).unwrap();
    // The writer keeps its connection open (WAL): the report reads anyway.
    let (ad, bd) = (a.to_str().unwrap(), b.to_str().unwrap());
    let (code, out, err) = run(
        &[
            "usage", "--dir", ad, "--dir", bd, "--month", "2026-03", "--format", "json",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"]["requests"], 12);
    assert_eq!(v["total"]["errors"], 1);
    assert_eq!(v["total"]["prompt_tokens"], 101);
    assert_eq!(v["groups"][0]["group"], "openai");
    assert_eq!(v["groups"][0]["requests"], 11);
    assert_eq!(v["groups"][0]["latency_p50_ms"], 60);
    assert_eq!(v["groups"][0]["latency_p99_ms"], 200);

    let (code, out, _) = run(
        &[
            "usage", "--dir", ad, "--dir", bd, "--month", "2026-03", "--by", "caller", "--format",
            "csv",
        ],
        dir.path(),
    );
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "caller,requests,errors,prompt_tokens,completion_tokens,total_tokens,cost_usd,latency_p50_ms,latency_p95_ms,latency_p99_ms");
    assert!(
        lines.contains(&"app,10,0,100,50,150,0.000000,50,100,100"),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.starts_with("(none),1,1,")));
    assert!(lines.last().unwrap().starts_with("TOTAL,12,1,"));

    let (code, out, _) = run(
        &["usage", "--dir", ad, "--month", "2026-03", "--by", "model"],
        dir.path(),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("MODEL") && out.contains("gpt-4o") && out.contains("TOTAL"),
        "{out}"
    );

    let (code, _, err) = run(
        &["usage", "--dir", "missing-dir", "--month", "2026-03"],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&["usage", "--dir", ad, "--month", "2026-13"], dir.path());
    assert_eq!(code, 2);
    // Usage dir from the config, no file for that month: empty totals.
    std::fs::write(dir.path().join("c.yaml"), "usage:\n  dir: a\nopenai_clients:\n  - { name: x, base_url: \"http://h/v1\", api_key: k, model_match: { type: exact, value: [m] } }\n").unwrap();
    let (code, out, err) = run(
        &[
            "usage", "--config", "c.yaml", "--month", "2026-04", "--format", "json",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no usage file for 2026-04"));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["total"]["requests"],
        0
    );
    drop((ca, cb));
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is needed for this test (apt-get install systemd)");
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gptbalance.service"),
    )
    .unwrap();
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=gptbalance",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needle), "{needle}");
    }
    // Verify against the binary just built, at the path the unit names.
    let local = unit.replace("/usr/local/bin/gptbalance", BIN);
    let path = dir.path().join("gptbalance.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Dockerfile, read as text (no Docker engine runs the tests): its
/// health check runs the real `health` subcommand, with the very flags it
/// names, against a real gateway; the build caches dependencies; the
/// build context leaves `target/` out but keeps what the build copies.
#[tokio::test]
async fn the_dockerfile_checks_readyz_drains_on_sigterm_and_caches_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    // Instructions, with continuation lines joined.
    let joined = file.replace("\\\n", " ");
    let instructions: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let find = |prefix: &str| -> Vec<&str> {
        instructions
            .iter()
            .copied()
            .filter(|l| l.starts_with(prefix))
            .collect()
    };
    assert_eq!(find("STOPSIGNAL"), ["STOPSIGNAL SIGTERM"]);

    let health = find("HEALTHCHECK");
    assert_eq!(health.len(), 1, "{health:?}");
    let exec = health[0]
        .split_once(" CMD ")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    let args: Vec<String> = serde_json::from_str(exec.trim()).expect("exec form");
    assert_eq!(args[..2], ["gptbalance", "health"], "{args:?}");
    let url_at = args.iter().position(|a| a == "--url").expect("--url") + 1;
    assert_eq!(args[url_at], "http://127.0.0.1:8000/readyz");
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&format!(
        "usage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(&up, "")
    ))
    .await;
    let mut probe = args[1..].to_vec();
    probe[url_at - 1] = gw.url("/readyz");
    let (code, out, err) = run_async(probe.clone(), root.to_owned()).await;
    assert_eq!(code, 0, "{probe:?}: {out}{err}");
    drop(gw);

    // Cargo.toml and Cargo.lock are copied, and dependencies built, before
    // src/: the dependency layer survives a source change.
    let position = |needle: &str| {
        instructions
            .iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the Dockerfile"))
    };
    let manifests = position("COPY Cargo.toml Cargo.lock");
    let sources = position("COPY src src");
    assert!(
        instructions[manifests..sources]
            .iter()
            .any(|l| l.starts_with("RUN") && l.contains("cargo build --release --locked")),
        "{instructions:#?}"
    );
    assert!(instructions[sources..]
        .iter()
        .any(|l| l.starts_with("RUN") && l.contains("cargo build --release --locked")));

    // The build context: target/ out, every copied path in.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(ignored.contains(&"target/"), "{ignored:?}");
    for copy in find("COPY ").iter().filter(|l| !l.contains("--from")) {
        let parts: Vec<&str> = copy.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(root.join(source).exists(), "{source}");
            assert!(
                !ignored
                    .iter()
                    .any(|i| source.starts_with(i.trim_end_matches('/'))),
                "{source} is copied but .dockerignore leaves it out"
            );
        }
    }

    // The config directory is mounted, not the file (a rename-save would
    // never reach the container), and the stop timeout is documented.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for text in [&file, &readme] {
        assert!(text.contains(":/etc/gptbalance:ro"));
        assert!(!text.contains(":/etc/gptbalance/config.yaml"));
        assert!(text.contains("--stop-timeout"));
    }
}

/// `./run.sh demo` builds the router exactly as `cargo build --release`
/// does: the mock upstream, an example with dev-dependency features, is
/// built in a cargo invocation of its own.
#[test]
fn the_demo_builds_the_router_apart_from_its_example() {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("run.sh")).unwrap();
    let demo = script
        .split("  demo)")
        .nth(1)
        .and_then(|rest| rest.split(";;").next())
        .expect("a demo) case");
    let builds: Vec<&str> = demo
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("build "))
        .collect();
    assert_eq!(
        builds,
        ["build --bin gptbalance", "build --example mock_upstream"]
    );
}

/// Every key of the schema has its row in the README's config reference.
#[test]
fn the_readme_documents_every_config_key() {
    use gptbalance::config::schema::*;
    fn fields<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = serde_yaml::from_str::<T>("__probe__: 1")
            .unwrap_err()
            .to_string();
        let list = err
            .split("expected")
            .nth(1)
            .unwrap_or_else(|| panic!("{err}"));
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let reference = &readme
        [readme.find("## Config reference").unwrap()..readme.find("## HTTP surface").unwrap()];
    let mut all = fields::<ServerSection>();
    all.extend(fields::<RoutingSection>());
    all.extend(fields::<UsageSection>());
    all.extend(fields::<LoggingSection>());
    all.extend(fields::<ClientSection>());
    all.extend(fields::<ModelMatchSection>());
    all.extend(fields::<CallerSection>());
    all.extend(fields::<LimitsSection>());
    all.extend(fields::<BudgetSection>());
    all.extend(fields::<PriceSection>());
    all.extend(fields::<ShadowSection>());
    all.extend(fields::<SharedStateSection>());
    all.extend(TOP_LEVEL_KEYS.iter().map(|k| k.to_string()));
    assert!(all.len() > 40, "{all:?}");
    for key in all {
        assert!(
            reference.contains(&format!("`{key}`")),
            "README's config reference does not mention `{key}`"
        );
    }
}
