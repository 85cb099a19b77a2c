//! The real binary: config diagnostics, exit codes, and `serve` from start
//! to SIGTERM.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("GPTBALANCE_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const BROKEN: &str = r#"server:
  listen: "127.0.0.1:8000"
  max_body_byte: 5
openai_clients:
  - name: a
    base_url: "http://127.0.0.1:9/v1"
    api_key: "${MISSING_KEY}"
    prioirty: 1
    model_match: { type: exact, value: [m] }
  - name: b
    base_url: "http://127.0.0.1:9/v1"
    api_key: "k"
    model_match: { type: regex, value: ["gpt-(4"] }
"#;

#[test]
fn validate_config_reports_every_error_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "config.yaml", BROKEN);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.contains(
            &format!("{path}:3:3: unknown key `max_body_byte` (did you mean `max_body_bytes`?)")
                .as_str()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &format!("{path}:8:5: unknown key `prioirty` (did you mean `priority`?)").as_str()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&format!("{path}:13:41: invalid regex `gpt-(4`: unclosed group").as_str()),
        "{lines:#?}"
    );

    // The unset variable is named with its line once the other errors are fixed.
    let fixed = BROKEN
        .replace("  max_body_byte: 5\n", "")
        .replace("    prioirty: 1\n", "")
        .replace("gpt-(4", "gpt-4");
    let path = write(dir.path(), "config.yaml", &fixed);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains(&format!(
            "{path}:6:14: environment variable `MISSING_KEY` is not set"
        )),
        "{}",
        out.stdout
    );
    let out = run(
        &["validate-config", "--config", &path],
        &[("MISSING_KEY", "sk-x")],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn validate_config_formats_and_strict_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let public = "server:\n  listen: \"0.0.0.0:8000\"\nopenai_clients:\n  - { name: a, base_url: \"http://h/v1\", api_key: k, model_match: { type: exact, value: [m] } }\n";
    let path = write(dir.path(), "c.yaml", public);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 0);
    assert!(
        out.stderr.contains("warning: auth is disabled"),
        "{}",
        out.stderr
    );
    let out = run(
        &["validate-config", "--config", &path, "--strict"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 1);
    let out = run(
        &["validate-config", "--config", &path, "--format", "json"],
        &[],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v[0]["severity"], "warning");
    assert_eq!(v[0]["line"], 2);
    assert_eq!(v[0]["path"], path.as_str());

    let path = write(dir.path(), "bad.yaml", BROKEN);
    let out = run(
        &["validate-config", "--config", &path, "--format", "github"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains(&format!("::error file={path},line=3,col=3::unknown key")),
        "{}",
        out.stdout
    );

    let out = run(
        &["validate-config", "--config", "does-not-exist.yaml"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 2);
    let out = run(&["validate-config", "--bogus-flag"], &[], dir.path());
    assert_eq!(out.code, 2);
}

#[test]
fn placeholder_and_short_tokens_warn_and_fail_strict() {
    let dir = tempfile::tempdir().unwrap();
    let text = "server:
  auth_tokens:
    - \"change-me\"
    - { name: app, token: \"Sk-Replace-Me\" }
    - \"xxxxxxxxxxxxxxxxxxxxxxxx\"
    - \"short-but-real\"
    - \"3f9a0c1e7b2d4a6f8e0c2b4d\"
  admin_token: \"${ADMIN:-your-api-key-here}\"
openai_clients:
  - { name: a, base_url: \"http://h/v1\", api_key: k, model_match: { type: exact, value: [m] } }
";
    let path = write(dir.path(), "c.yaml", text);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let placeholder =
        "a well-known placeholder value; set a random token of at least 16 characters";
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("warning:"))
        .collect();
    assert_eq!(
        warnings,
        [
            format!("{path}:3:7: warning: server.auth_tokens[0]: {placeholder} (e.g. `openssl rand -hex 24`)"),
            format!("{path}:4:27: warning: server.auth_tokens[1].token: {placeholder} (e.g. `openssl rand -hex 24`)"),
            format!("{path}:5:7: warning: server.auth_tokens[2]: {placeholder} (e.g. `openssl rand -hex 24`)"),
            format!("{path}:6:7: warning: server.auth_tokens[3]: only 14 characters; use a random token of at least 16 (e.g. `openssl rand -hex 24`)"),
            format!("{path}:8:16: warning: server.admin_token: {placeholder} (e.g. `openssl rand -hex 24`)"),
        ],
        "{}",
        out.stderr
    );
    for token in [
        "change-me",
        "Sk-Replace-Me",
        "short-but-real",
        "your-api-key",
    ] {
        assert!(
            !out.stderr.contains(&format!("`{token}`")),
            "{}",
            out.stderr
        );
    }
    let out = run(
        &["validate-config", "--config", &path, "--strict"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout.lines().count(), 5, "{}", out.stdout);

    // A real admin token from the environment silences its warning.
    let out = run(
        &["validate-config", "--config", &path],
        &[("ADMIN", "b7e1c94a0d2f6e83a5c7")],
        dir.path(),
    );
    assert_eq!(out.stderr.matches("warning:").count(), 4, "{}", out.stderr);

    // The image's default config passes, warning about its placeholders;
    // --strict refuses it until real tokens are set.
    let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docker/config.yaml");
    let docker = docker.to_str().unwrap();
    let out = run(&["validate-config", "--config", docker], &[], dir.path());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stderr.matches("placeholder").count(),
        2,
        "{}",
        out.stderr
    );
    let out = run(
        &["validate-config", "--config", docker, "--strict"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let tokens = [
        ("GPTBALANCE_TOKEN", "5c0b8e2a9f4d71e6b3a8"),
        ("GPTBALANCE_ADMIN_TOKEN", "e4a91f07c2d85b36a0f1"),
    ];
    let out = run(
        &["validate-config", "--config", docker, "--strict"],
        &tokens,
        dir.path(),
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn an_unknown_key_is_reported_alone_with_the_nearest_key_and_ok_goes_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    // With `b` unreadable, `n` falls to the keyword client `c`, whose
    // fallback would close a cycle that `b`'s own fallback breaks.
    let text = r#"openai_clients:
  - { name: a, base_url: "http://h/v1", api_key: k, model_match: { type: exact, value: [m] }, fallback: n }
  - name: b
    base_url: "http://h/v1"
    api_keyz: k
    model_match: { type: exact, value: [n] }
    fallback: x
  - { name: c, base_url: "http://h/v1", api_key: k, model_match: { type: keyword, value: [n] }, fallback: m }
  - { name: d, base_url: "http://h/v1", api_key: k, model_match: { type: exact, value: [x] } }
"#;
    let path = write(dir.path(), "c.yaml", text);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stdout,
        format!("{path}:5:5: unknown key `api_keyz` (did you mean `api_key`?)\n"),
        "{}",
        out.stderr
    );
    // Fixed, it is valid, and the verdict is a result: stdout.
    let path = write(dir.path(), "c.yaml", &text.replace("api_keyz", "api_key"));
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, format!("{path}: ok\n"));
    assert_eq!(out.stderr, "");
}

#[test]
fn yaml_syntax_errors_and_duplicates_and_cycles_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "c.yaml",
        "openai_clients:\n  - name: a\n   bad: [\n",
    );
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.starts_with(&format!("{path}:3:")),
        "{}",
        out.stdout
    );

    let text = r#"openai_clients:
  - { name: a, base_url: "http://h/v1", api_key: k, model_match: { type: exact, value: [m1] }, fallback: m2 }
  - { name: a, base_url: "http://h/v1", api_key: k, model_match: { type: exact, value: [m2] }, fallback: [m1] }
  - { name: c, base_url: "http://h/v1", api_keys: [], model_match: { type: exact, value: [m3] }, fallback: nowhere }
  - { name: d, base_url: "http://h/v1", api_key: k, model_match: { type: exact, value: [m4] }, headers: { X-Key: a, x-key: b } }
"#;
    let path = write(dir.path(), "c.yaml", text);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("duplicate client name `a`"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("fallback cycle: m2 -> m1 -> m2")
            || out.stdout.contains("fallback cycle: m1 -> m2 -> m1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("client `c` has no keys"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("fallback target `nowhere` of client `c` is matched by no client"),
        "{}",
        out.stdout
    );
    // BTreeMap order: `X-Key` before `x-key`, which is the one refused.
    assert!(
        out.stdout
            .contains("header `x-key` is set twice (header names ignore case)"),
        "{}",
        out.stdout
    );
}

#[test]
fn every_shipped_config_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let env = [
        ("OPENAI_API_KEY", "sk-test"),
        ("DEEPSEEK_API_KEY", "sk-test"),
        ("AZURE_OPENAI_KEY", "az"),
        ("OPENAI_KEY_1", "1"),
        ("OPENAI_KEY_2", "2"),
        ("OPENAI_KEY_3", "3"),
        ("RESELLER_KEY", "r"),
        ("BACKUP_KEY", "b"),
        ("ANTHROPIC_API_KEY", "sk-ant"),
    ];
    let mut files = vec![
        root.join("config/config.yaml"),
        root.join("examples/demo/config.yaml"),
        root.join("examples/docker/config.yaml"),
    ];
    for e in std::fs::read_dir(root.join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 6);
    for f in files {
        let out = run(
            &["validate-config", "--config", f.to_str().unwrap()],
            &env,
            root,
        );
        assert_eq!(out.code, 0, "{}: {}{}", f.display(), out.stdout, out.stderr);
    }
}

#[test]
fn gpt_api_config_loads_unchanged() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/gpt_api-migration.yaml")).unwrap();
    let env = |name: &str| match name {
        "OPENAI_API_KEY" => Some("sk-o".to_owned()),
        "DEEPSEEK_API_KEY" => Some("sk-d".to_owned()),
        _ => None,
    };
    let cfg = gptbalance::config::load_str(&text, Path::new("config.yaml"), &env)
        .unwrap()
        .config;
    let names: Vec<&str> = cfg.clients.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["official_openai", "deepseek", "local_llm"]);
    assert_eq!(cfg.clients[0].fallback, ["deepseek-chat"]);
    assert!(
        cfg.clients[1].fallback.is_empty(),
        "`fallback: False` means none"
    );
    assert_eq!(cfg.clients[1].special_prefix.as_deref(), Some("<think>\n"));
    assert_eq!(
        cfg.clients[1].stop.as_deref(),
        Some(&["<|endoftext|>".to_owned()][..])
    );
    assert_eq!(cfg.clients[2].keys[0].expose(), "not-needed");
    assert_eq!(cfg.clients[0].priority, 1);
}

#[test]
fn numbers_and_durations_come_from_env_and_relative_paths_from_the_file() {
    let text = "routing:\n  max_attempts: ${ATTEMPTS}\n  cooldown: ${COOL:-90}\nusage:\n  dir: data/usage\nopenai_clients:\n  - { name: a, base_url: \"http://h/v1\", api_key: k, priority: \"${PRIO:-7}\", model_match: { type: exact, value: [m] } }\n";
    let env = |n: &str| (n == "ATTEMPTS").then(|| "4".to_owned());
    let cfg = gptbalance::config::load_str(text, Path::new("/etc/gptbalance/config.yaml"), &env)
        .unwrap()
        .config;
    assert_eq!(cfg.routing.max_attempts, 4);
    assert_eq!(cfg.routing.cooldown, Duration::from_secs(90));
    assert_eq!(cfg.clients[0].priority, 7);
    assert_eq!(cfg.usage.dir, Path::new("/etc/gptbalance/data/usage"));
    // Expansion never adds structure.
    let env = |n: &str| (n == "X").then(|| "a\nb: c".to_owned());
    let text = "openai_clients:\n  - { name: a, base_url: \"http://h/v1\", api_key: \"${X}\", model_match: { type: exact, value: [m] } }\n";
    let r = gptbalance::config::load_str(text, Path::new("c.yaml"), &env);
    let diags = r.unwrap_err();
    assert!(
        diags
            .iter()
            .any(|d| d.message.contains("control character")),
        "{diags:?}"
    );
}

/// Starts `serve` and returns the child and the address it listens on.
fn spawn_serve(config: &str, dir: &Path) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config, "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_owned();
                return (child, addr, rx);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not report its address");
}

fn sigterm(child: &Child) {
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[tokio::test]
async fn serve_routes_then_drains_on_sigterm_and_exits_0() {
    let up = common::MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "usage:\n  dir: ./usage\nopenai_clients:\n{}",
        common::client_yaml(
            "c",
            &up.url(),
            &["sk-serve-secret"],
            "model_match: { type: exact, value: [m] }"
        )
    );
    let path = write(dir.path(), "config.yaml", &cfg);
    let (mut child, addr, logs) = spawn_serve(&path, dir.path());
    let r = common::post(
        &format!("http://{addr}/v1/chat/completions"),
        common::chat("m"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "hello from up"
    );
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // One "draining" line for the process, however many workers it runs.
    let lines: Vec<String> = logs.iter().collect();
    let draining = lines.iter().filter(|l| l.contains("draining")).count();
    assert_eq!(draining, 1, "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:#?}");
    let files: Vec<_> = std::fs::read_dir(dir.path().join("usage"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().starts_with("usage-")),
        "{files:?}"
    );
}

#[test]
fn serve_exit_codes_for_bad_configs_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "config.yaml", BROKEN);
    let out = run(&["serve", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("{path}:3:3: unknown key")),
        "{}",
        out.stderr
    );

    let out = run(&["serve", "--config", "missing.yaml"], &[], dir.path());
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("missing.yaml"), "{}", out.stderr);

    // $GPTBALANCE_CONFIG is the default --config.
    let out = run(&["serve"], &[("GPTBALANCE_CONFIG", &path)], dir.path());
    assert_eq!(out.code, 1);

    // A usage dir that cannot be created stops serve (exit 2, naming it).
    let blocker = write(dir.path(), "blocker", "a file, not a directory");
    let cfg = format!(
        "usage:\n  dir: {blocker}/usage\nopenai_clients:\n  - {{ name: a, base_url: \"http://127.0.0.1:9/v1\", api_key: k, model_match: {{ type: exact, value: [m] }} }}\n"
    );
    let path = write(dir.path(), "c2.yaml", &cfg);
    let out = run(
        &["serve", "--config", &path, "--listen", "127.0.0.1:0"],
        &[],
        dir.path(),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("{blocker}/usage")),
        "{}",
        out.stderr
    );
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["--version"], &[], dir.path());
    assert_eq!(out.code, 0);
    assert!(out.stdout.starts_with("gptbalance "));
    let out = run(&["--help"], &[], dir.path());
    for cmd in ["serve", "validate-config", "check-keys", "route", "usage"] {
        assert!(out.stdout.contains(cmd), "{}", out.stdout);
    }
}

/// Runs a `serve` that must fail to start; one that starts instead is
/// killed after 20 s rather than hanging the test.
fn serve_fails(config: &str, listen: &str, dir: &Path) -> Out {
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config, "--listen", listen])
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn a_second_serve_on_a_used_address_or_usage_dir_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let client = "  - { name: a, base_url: \"http://127.0.0.1:9/v1\", api_key: k, model_match: { type: exact, value: [m] } }\n";
    let first = write(
        dir.path(),
        "first.yaml",
        &format!("usage:\n  dir: ./usage\nopenai_clients:\n{client}"),
    );
    let (mut child, addr, _logs) = spawn_serve(&first, dir.path());

    // Another instance on the same address, with a usage dir of its own:
    // SO_REUSEPORT must not let it share the port.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let second = write(
        &other,
        "second.yaml",
        &format!("usage:\n  dir: ./usage\nopenai_clients:\n{client}"),
    );
    let out = serve_fails(&second, &addr, &other);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("cannot listen on {addr}: address already in use")),
        "{}",
        out.stderr
    );
    // The first instance still answers every connection.
    for _ in 0..8 {
        let r = common::get(&format!("http://{addr}/healthz"), &[]).await;
        assert_eq!(r.status, 200);
    }

    // Another instance on another port but the same usage dir.
    let out = serve_fails(&first, "127.0.0.1:0", dir.path());
    assert_eq!(out.code, 2, "{}", out.stderr);
    let usage = dir.path().join("usage");
    assert!(
        out.stderr.contains(&format!(
            "usage.dir {} is in use by another running gptbalance (process {})",
            usage.display(),
            child.id()
        )),
        "{}",
        out.stderr
    );

    // The lock goes with the process: a restart after SIGTERM gets it.
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let (mut again, _, _logs) = spawn_serve(&first, dir.path());
    let _ = again.kill();
    let _ = again.wait();
    let (mut after_kill, _, _logs) = spawn_serve(&first, dir.path());
    sigterm(&after_kill);
    assert_eq!(after_kill.wait().unwrap().code(), Some(0));
}

#[test]
fn serve_refuses_an_address_a_plain_listener_holds() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let path = write(
        dir.path(),
        "config.yaml",
        "usage:\n  enabled: false\nopenai_clients:\n  - { name: a, base_url: \"http://127.0.0.1:9/v1\", api_key: k, model_match: { type: exact, value: [m] } }\n",
    );
    let out = serve_fails(&path, &addr, dir.path());
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("cannot listen on {addr}")),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn health_probes_readyz_of_a_real_gateway() {
    let up = common::MockUpstream::start("up").await;
    let gw = common::Gateway::start(&format!(
        "server:\n  auth_tokens: [\"a-caller-token-of-some-length\"]\nusage:\n  enabled: false\nopenai_clients:\n{}",
        common::one_client(&up, "")
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let health = |url: String| {
        let dir = dir.path().to_owned();
        async move {
            tokio::task::spawn_blocking(move || run(&["health", "--url", &url], &[], &dir))
                .await
                .unwrap()
        }
    };
    // Ready: 200, and /readyz needs no token.
    let url = gw.url("/readyz");
    let out = health(url.clone()).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{url}: 200\n"));

    // Every key cooling down: /readyz answers 503, the probe says unhealthy.
    up.push(common::Reply::Json(
        401,
        serde_json::json!({"error": {"message": "bad key"}}),
    ));
    let r = common::post_with(
        &gw.url("/v1/chat/completions"),
        common::chat("m"),
        &[("authorization", "Bearer a-caller-token-of-some-length")],
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let out = health(url.clone()).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stderr, format!("unhealthy: {url} answered 503\n"));

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = health(format!("http://{closed}/readyz")).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.starts_with("unhealthy: "), "{}", out.stderr);

    // Usage errors: exit 2.
    for bad in [
        "ftp://example.com/readyz",
        "localhost:8000",
        "http:///readyz",
        "https://user@example.com/readyz",
    ] {
        let out = health(bad.to_owned()).await;
        assert_eq!(out.code, 2, "{bad}: {}", out.stderr);
    }
}

#[test]
fn cors_origins_must_be_origins() {
    let dir = tempfile::tempdir().unwrap();
    let client = "  - { name: a, base_url: \"http://h/v1\", api_key: k, model_match: { type: exact, value: [m] } }\n";
    let text = format!(
        "server:\n  cors:\n    allow_origins: [\"https://app.example.com/\", \"app.example.com\", \"*\"]\n    allow_headers: [\"x ok\"]\nopenai_clients:\n{client}"
    );
    let path = write(dir.path(), "c.yaml", &text);
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    let origin = "is not an origin such as \"https://app.example.com\" (scheme, host and port, no path) or \"*\"";
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        [
            format!(
                "{path}:3:21: server.cors.allow_origins[0]: `https://app.example.com/` {origin}"
            ),
            format!("{path}:3:49: server.cors.allow_origins[1]: `app.example.com` {origin}"),
            format!("{path}:4:21: server.cors.allow_headers[0]: `x ok` is not a header name"),
        ]
    );
    let path = write(
        dir.path(),
        "c.yaml",
        &format!("server:\n  cors: {{ allow_origins: [] }}\nopenai_clients:\n{client}"),
    );
    let out = run(&["validate-config", "--config", &path], &[], dir.path());
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("server.cors.allow_origins is empty"),
        "{}",
        out.stdout
    );
}

/// The next log line that contains every one of `parts` (10 s at most).
fn log_line(logs: &std::sync::mpsc::Receiver<String>, parts: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match logs.recv_timeout(left) {
            Ok(line) if parts.iter().all(|p| line.contains(p)) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no log line with {parts:?}; saw {seen:#?}");
}

#[tokio::test]
async fn the_access_log_has_a_line_per_request_with_the_callers_address() {
    let up = common::MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let client = common::client_yaml(
        "c",
        &up.url(),
        &["k"],
        "model_match: { type: exact, value: [m] }",
    );
    let start = |top: &str| {
        let path = write(
            dir.path(),
            "config.yaml",
            &format!("{top}usage:\n  enabled: false\nopenai_clients:\n{client}"),
        );
        spawn_serve(&path, dir.path())
    };
    let chat_from = |addr: &str, xff: &'static str| {
        let url = format!("http://{addr}/v1/chat/completions");
        async move { common::post_with(&url, common::chat("m"), &[("x-forwarded-for", xff)]).await }
    };

    // Behind a trusted proxy: the caller is the rightmost untrusted hop.
    let (mut child, addr, logs) = start("server:\n  trusted_proxies: [\"127.0.0.0/8\"]\n");
    assert_eq!(
        chat_from(&addr, "198.51.100.1, 203.0.113.7").await.status,
        200
    );
    let line = log_line(&logs, &["request", "method=POST"]);
    for part in [
        "remote_addr=203.0.113.7 peer=127.0.0.1:",
        "method=POST path=/v1/chat/completions",
        "client=\"c\"",
        "status=200",
        "latency_ms=",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    // Requests answered locally have their line too.
    let r = common::get(&format!("http://{addr}/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    let line = log_line(&logs, &["request", "path=/healthz"]);
    assert!(
        line.contains("remote_addr=127.0.0.1 peer=127.0.0.1:"),
        "{line}"
    );
    assert!(
        line.contains("method=GET path=/healthz status=200"),
        "{line}"
    );
    let r = common::get(&format!("http://{addr}/nothing-here?x=1"), &[]).await;
    assert_eq!(r.status, 404);
    let line = log_line(&logs, &["path=/nothing-here status=404"]);
    assert!(!line.contains("x=1"), "the query is not logged: {line}");
    let _ = child.kill();
    let _ = child.wait();

    // A request refused on its head (a bad token, its body never read)
    // has its line too, and the token is in none.
    let (mut child, addr, logs) =
        start("server:\n  auth_tokens: [\"a-caller-token-0123456789\"]\n");
    let r = common::post_with(
        &format!("http://{addr}/v1/chat/completions"),
        common::chat("m"),
        &[("authorization", "Bearer not-the-token-0123456789")],
    )
    .await;
    assert_eq!(r.status, 401);
    let line = log_line(&logs, &["request", "status=401"]);
    assert!(
        line.contains("method=POST path=/v1/chat/completions status=401"),
        "{line}"
    );
    assert!(!line.contains("not-the-token"), "{line}");
    let _ = child.kill();
    let _ = child.wait();

    // An untrusted peer's X-Forwarded-For is not believed.
    let (mut child, addr, logs) = start("");
    assert_eq!(chat_from(&addr, "203.0.113.7").await.status, 200);
    let line = log_line(&logs, &["request", "method=POST"]);
    assert!(
        line.contains("remote_addr=127.0.0.1 peer=127.0.0.1:"),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // logging.access: false: no line for requests that went well.
    let (child, addr, logs) = start("logging:\n  access: false\n");
    assert_eq!(chat_from(&addr, "203.0.113.7").await.status, 200);
    let r = common::get(&format!("http://{addr}/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    sigterm(&child);
    let lines: Vec<String> = logs.iter().collect();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(" request ") || l.contains("method=")),
        "{lines:#?}"
    );
    let mut child = child;
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
