//! The real binary as a daemon: signals, graceful drain, systemd notify,
//! log output, and no secret in any output.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

struct Daemon {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::start_limited(config, env, None)
    }

    /// Starts the daemon; with `max_file_bytes`, every file it writes is
    /// limited to that size (RLIMIT_FSIZE), as on a full disk.
    fn start_limited(config: &Path, env: &[(&str, &str)], max_file_bytes: Option<u64>) -> Daemon {
        let mut cmd = Command::new(BIN);
        if let Some(limit) = max_file_bytes {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(config.parent().unwrap())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = tx.send(
                        rest.trim_matches('"')
                            .split(['"', ' '])
                            .next()
                            .unwrap()
                            .to_owned(),
                    );
                } else if let Some(rest) = line.split("\"listen\":\"").nth(1) {
                    let _ = tx.send(rest.split('"').next().unwrap().to_owned());
                }
                l2.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no listen address; log: {:?}", log.lock().unwrap());
            }
        };
        Daemon { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stream(&self, model: &str) -> http::Response<hyper::body::Incoming> {
        open_stream(
            &self.url("/v1/chat/completions"),
            json!({"model": model, "stream": true, "messages": []}),
        )
        .await
    }

    async fn chat(&self, model: &str) -> Reply2 {
        post(&self.url("/v1/chat/completions"), chat(model)).await
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sets the running daemon's file-size limit (the disk "frees up").
    fn set_max_file_bytes(&self, limit: u64) {
        let lim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        let rc = unsafe {
            libc::prlimit(
                self.child.id() as i32,
                libc::RLIMIT_FSIZE,
                &lim,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    async fn wait(mut self) -> (i32, String) {
        let code =
            tokio::task::spawn_blocking(move || self.child.wait().unwrap().code().unwrap_or(-1))
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        (code, self.log.lock().unwrap().join("\n"))
    }
}

const SIGHUP: i32 = libc::SIGHUP;
const SIGTERM: i32 = libc::SIGTERM;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap()
}

fn month_file(dir: &Path) -> std::path::PathBuf {
    let month = humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7].to_owned();
    dir.join(format!("usage-{month}.sqlite"))
}

#[tokio::test]
async fn sigterm_under_load_drains_every_request_and_loses_no_usage_row() {
    let up = MockUpstream::start("up").await;
    up.set_default(Reply::Delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "server:\n  shutdown_grace: 10s\nusage:\n  dir: ./usage\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    );
    let d = Daemon::start(&config, &[]);
    // A stream that is still running when SIGTERM arrives finishes too.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    up.push(Reply::Sse {
        events: vec![chat_chunk("before"), chat_chunk("after"), DONE.to_owned()],
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let mut stream = d.stream("m").await;
    next_chunk(stream.body_mut()).await.unwrap().unwrap();

    let mut tasks = Vec::new();
    for _ in 0..60 {
        let url = d.url("/v1/chat/completions");
        tasks.push(tokio::spawn(
            async move { post(&url, chat("m")).await.status },
        ));
    }
    assert!(
        eventually(Duration::from_secs(5), || up.count() >= 61).await,
        "all requests reached the upstream"
    );
    // A keep-alive connection with nothing in flight.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut idle = tokio::net::TcpStream::connect(d.url("").trim_start_matches("http://"))
        .await
        .unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.ends_with(b"ok\n") {
        let mut b = [0u8; 512];
        let n = idle.read(&mut b).await.unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&b[..n]);
    }
    d.signal(SIGTERM);
    // Draining closes it at once, well before shutdown_grace.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed when draining starts")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(5);
    let rest = read_all(stream.body_mut())
        .await
        .expect("the stream finishes cleanly");
    assert!(rest.contains("after") && rest.ends_with(DONE));
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (code, log) = d.wait().await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        rows(&month_file(&dir.path().join("usage"))),
        61,
        "every request has its row"
    );
}

#[tokio::test]
async fn sighup_reloads_and_systemd_hears_ready_reloading_stopping_and_watchdog() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "server:\n  admin_token: adm\nusage:\n  enabled: false\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    );
    let d = Daemon::start(
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let recv = |want: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 512];
        while !seen.iter().any(|m| m.contains(want)) {
            let n = sock.recv(&mut buf).expect("a notify message");
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    recv("READY=1", &mut seen);
    recv("WATCHDOG=1", &mut seen);

    d.signal(SIGHUP);
    recv("RELOADING=1", &mut seen);
    let status = get(&d.url("/admin/status"), &[("authorization", "Bearer adm")])
        .await
        .json();
    let mut generation = status["generation"].as_u64().unwrap();
    for _ in 0..50 {
        if generation >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        generation = get(&d.url("/admin/status"), &[("authorization", "Bearer adm")])
            .await
            .json()["generation"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(generation, 2, "SIGHUP reloaded");
    let reloading = seen.iter().position(|m| m.contains("RELOADING=1")).unwrap();
    seen.drain(..=reloading);
    recv("READY=1", &mut seen);

    d.signal(SIGTERM);
    recv("STOPPING=1", &mut seen);
    let (code, _) = d.wait().await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn no_secret_reaches_logs_metrics_status_errors_or_usage_files() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        "sk-SECRET-upstream-key-1",
        "sk-SECRET-upstream-key-2",
        "tok-SECRET-caller",
        "adm-SECRET-admin",
    ];
    let config = write_config(
        dir.path(),
        &format!(
            "server:\n  auth_tokens:\n    - {{ name: app, token: \"${{CALLER_TOKEN}}\" }}\n  admin_token: \"${{ADMIN_TOKEN}}\"\nusage:\n  dir: ./usage\nlogging:\n  dir: ./logs\n  format: json\n  level: debug\nopenai_clients:\n{}",
            client_yaml("c", &up.url(), &["${KEY_1}", "${KEY_2}"], "headers: { x-extra-auth: \"${KEY_1}\" }\nmodel_match: { type: exact, value: [m] }")
        ),
    );
    let d = Daemon::start(
        &config,
        &[
            ("KEY_1", secrets[0]),
            ("KEY_2", secrets[1]),
            ("CALLER_TOKEN", secrets[2]),
            ("ADMIN_TOKEN", secrets[3]),
        ],
    );
    let caller = [("authorization", "Bearer tok-SECRET-caller")];
    let mut outputs = Vec::new();
    up.push(Reply::Json(
        401,
        json!({"error": {"message": "Incorrect API key"}}),
    ));
    up.push(Reply::Json(500, json!({})));
    for body in [
        chat("m"),
        chat("m"),
        chat("nope"),
        json!({"model": "m", "stream": true, "messages": []}),
    ] {
        let r = post_with(&d.url("/v1/chat/completions"), body, &caller).await;
        outputs.push(r.text());
    }
    outputs.push(
        post_with(
            &d.url("/v1/chat/completions"),
            chat("m"),
            &[("authorization", "Bearer wrong")],
        )
        .await
        .text(),
    );
    outputs.push(get(&d.url("/metrics"), &caller).await.text());
    outputs.push(
        get(
            &d.url("/admin/status"),
            &[("authorization", "Bearer adm-SECRET-admin")],
        )
        .await
        .text(),
    );
    // The upstream did get the keys: the test would notice if they were missing.
    assert!(up
        .requests()
        .iter()
        .any(|r| r.auth() == format!("Bearer {}", secrets[0])));
    d.signal(SIGTERM);
    let (code, stderr) = d.wait().await;
    assert_eq!(code, 0);
    outputs.push(stderr);
    for dir in ["logs", "usage"] {
        for e in std::fs::read_dir(dir_path(dir, &config)).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            outputs.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    let everything = outputs.join("\n");
    assert!(
        everything.contains("\"request_id\""),
        "JSON log lines were collected"
    );
    for s in secrets {
        assert!(!everything.contains(s), "secret {s} leaked");
        assert!(!everything.contains(&s[3..]), "part of secret {s} leaked");
    }
    // Every log line on stderr and in files is JSON.
    let log_file = std::fs::read_dir(dir_path("logs", &config))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for line in std::fs::read_to_string(log_file).unwrap().lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|_| panic!("not JSON: {line}"));
    }
}

fn dir_path(name: &str, config: &Path) -> std::path::PathBuf {
    config.parent().unwrap().join(name)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn a_full_disk_drops_rows_but_not_requests_and_writing_resumes() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "usage:\n  dir: ./usage\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    );
    let d = Daemon::start_limited(&config, &[], Some(96 * 1024));
    let dropped = "gptbalance_usage_rows_total{result=\"dropped\"}";
    let written = "gptbalance_usage_rows_total{result=\"written\"}";
    let pad = "p".repeat(3000);
    let mut full = false;
    for _ in 0..400 {
        let r = post(
            &d.url("/v1/chat/completions"),
            json!({"model": "m", "messages": [], "user": pad}),
        )
        .await;
        assert_eq!(r.status, 200, "serving goes on");
        // A long model name makes rows big, so the limit is reached soon.
        let r = post(
            &d.url("/v1/chat/completions"),
            json!({"model": "x".repeat(250), "messages": []}),
        )
        .await;
        assert_eq!(r.status, 404);
        if metric(&get(&d.url("/metrics"), &[]).await.text(), dropped) > 0 {
            full = true;
            break;
        }
    }
    assert!(full, "rows were dropped once the file could not grow");
    d.set_max_file_bytes(libc::RLIM_INFINITY);
    let before = metric(&get(&d.url("/metrics"), &[]).await.text(), written);
    for _ in 0..5 {
        assert_eq!(d.chat("m").await.status, 200);
    }
    let mut after = before;
    for _ in 0..100 {
        after = metric(&get(&d.url("/metrics"), &[]).await.text(), written);
        if after >= before + 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(after >= before + 5, "writing resumed: {before} -> {after}");
    d.signal(SIGTERM);
    let (code, log) = d.wait().await;
    assert_eq!(code, 0);
    assert!(log.contains("usage rows dropped"), "the drop is logged");
    let db = rusqlite::Connection::open(month_file(&dir.path().join("usage"))).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn kill_9_loses_at_most_the_last_second_and_the_next_start_appends() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "usage:\n  dir: ./usage\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    );
    let d = Daemon::start(&config, &[]);
    let mut finished = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let mut batch = Vec::new();
        for _ in 0..8 {
            let url = d.url("/v1/chat/completions");
            batch.push(tokio::spawn(
                async move { post(&url, chat("m")).await.status },
            ));
        }
        for t in batch {
            assert_eq!(t.await.unwrap(), 200);
            finished.push(std::time::Instant::now());
        }
    }
    d.signal(libc::SIGKILL);
    let killed_at = std::time::Instant::now();
    let (code, _) = d.wait().await;
    assert_eq!(code, -1, "killed by a signal");
    let db_path = month_file(&dir.path().join("usage"));
    let kept = rows(&db_path) as usize;
    let last_second = finished
        .iter()
        .filter(|t| killed_at.duration_since(**t) < Duration::from_secs(1))
        .count();
    assert!(
        kept + last_second >= finished.len(),
        "kept {kept} of {} ({last_second} in the last second)",
        finished.len()
    );
    assert!(kept <= finished.len());

    let d = Daemon::start(&config, &[]);
    for _ in 0..10 {
        assert_eq!(d.chat("m").await.status, 200);
    }
    d.signal(SIGTERM);
    assert_eq!(d.wait().await.0, 0);
    assert_eq!(
        rows(&db_path) as usize,
        kept + 10,
        "the same month file, appended to"
    );
}

/// A caller's budget spent before `kill -TERM` is still spent after the
/// restart: the daemon reads it back from its usage file.
#[tokio::test]
async fn a_callers_spend_survives_sigterm_and_restart() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    // Each answer reports 18 tokens; room for 3 answers and a bit.
    let config = write_config(
        dir.path(),
        &format!(
            "server:\n  admin_token: admin-0123456789abcdef\nusage:\n  dir: ./usage\ncallers:\n  - name: app\n    token: \"${{APP_TOKEN}}\"\n    max_tokens_default: 1\n    limits: {{ budget_tokens: {{ amount: 70, per: month }} }}\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    );
    let env = [("APP_TOKEN", "app-token-0123456789")];
    let ask = |d: &Daemon| {
        let url = d.url("/v1/chat/completions");
        async move {
            post_with(
                &url,
                json!({"model": "m", "messages": []}),
                &[("authorization", "Bearer app-token-0123456789")],
            )
            .await
            .status
        }
    };
    let d = Daemon::start(&config, &env);
    for _ in 0..3 {
        assert_eq!(ask(&d).await, 200);
    }
    d.signal(SIGTERM);
    let (code, _) = d.wait().await;
    assert_eq!(code, 0);
    let d = Daemon::start(&config, &env);
    let status = get(
        &d.url("/admin/status"),
        &[("authorization", "Bearer admin-0123456789abcdef")],
    )
    .await;
    assert_eq!(status.json()["callers"][0]["spent_tokens"], 54);
    // 54 spent + this request's reservation (about 10 tokens) fits; the
    // next one does not.
    assert_eq!(ask(&d).await, 200);
    assert_eq!(ask(&d).await, 429);
    d.signal(SIGTERM);
    let (_, log) = d.wait().await;
    assert!(!log.contains("app-token-0123456789"));
    assert_eq!(up.count(), 4);
}
