//! Fault injection: upstreams, callers, storage and processes misbehaving.
//! Each fault gets the right failover or error, and a usage row saying so.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn cfg(clients: &[String], top: &str) -> String {
    format!("{top}openai_clients:\n{}", clients.concat())
}

fn month() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7].to_owned()
}

/// Every `error` column of the usage file, in order.
fn row_errors(dir: &Path) -> Vec<(i64, Option<String>)> {
    let db =
        rusqlite::Connection::open(dir.join(format!("usage/usage-{}.sqlite", month()))).unwrap();
    let mut stmt = db
        .prepare("SELECT status, error FROM requests ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An "upstream" that answers every connection with `reply` and closes.
async fn raw_upstream(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn non_http_replies_fail_over_and_a_lone_one_is_a_502_with_its_row() {
    let garbage = raw_upstream(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let ok = MockUpstream::start("ok").await;
    let gw = Gateway::start(&cfg(
        &[
            client_yaml(
                "garbage",
                &garbage,
                &["k"],
                "priority: 1\nmodel_match: { type: keyword, value: [m] }",
            ),
            client_yaml(
                "ok",
                &ok.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: exact, value: [m] }",
            ),
        ],
        "usage:\n  dir: ./usage\n",
    ))
    .await;
    // "m" matches `ok` exactly; "m2" only the garbage client.
    let r = gw.chat("m2").await;
    assert_eq!(r.status, 502);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("garbage"));
    let dir = gw.stop().await;
    let rows = row_errors(dir.path());
    assert_eq!(rows[0].0, 502);
    assert!(
        rows[0]
            .1
            .as_deref()
            .unwrap()
            .contains("clients tried: garbage"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn html_and_invalid_json_with_200_pass_through_and_are_noted() {
    let up = MockUpstream::start("up").await;
    up.push(Reply::Raw(
        200,
        vec![("content-type".into(), "text/html".into())],
        "<html>maintenance</html>".into(),
    ));
    up.push(Reply::Raw(200, vec![], "{\"choices\": [trunc".into()));
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  dir: ./usage\n")).await;
    let r = gw.chat("m").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "<html>maintenance</html>")
    );
    let r = gw.chat("m").await;
    assert_eq!((r.status, r.text().as_str()), (200, "{\"choices\": [trunc"));
    let dir = gw.stop().await;
    let rows = row_errors(dir.path());
    assert!(
        rows[0].1.as_deref().unwrap().contains("text/html"),
        "{rows:?}"
    );
    assert!(
        rows[1].1.as_deref().unwrap().contains("not valid JSON"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn huge_responses_and_slow_drips_are_relayed_whole() {
    let up = MockUpstream::start("up").await;
    let big = format!("{{\"data\":\"{}\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}}}", "x".repeat(20 << 20));
    up.push(Reply::Raw(200, vec![], big.clone()));
    let drip: Vec<String> = (0..10).map(|i| chat_chunk(&format!("d{i}"))).collect();
    up.push(Reply::Sse {
        events: drip.clone(),
        gate: None,
        abort_at_end: false,
    });
    let gw = Gateway::start(&cfg(
        &[one_client(&up, "idle_timeout: 2s\n")],
        "usage:\n  dir: ./usage\n",
    ))
    .await;
    let r = gw.chat("m").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    let mut resp = gw.stream("m").await;
    assert_eq!(read_all(resp.body_mut()).await.unwrap(), drip.concat());
    let dir = gw.stop().await;
    let db = rusqlite::Connection::open(dir.path().join(format!("usage/usage-{}.sqlite", month())))
        .unwrap();
    let tokens: Option<i64> = db
        .query_row(
            "SELECT total_tokens FROM requests ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tokens, Some(3), "usage read from the tail of a 20 MiB body");
}

#[tokio::test]
async fn redirects_are_not_followed_with_a_key() {
    let target = MockUpstream::start("target").await;
    let up = MockUpstream::start("up").await;
    up.push(Reply::Raw(
        307,
        vec![(
            "location".into(),
            format!("{}/chat/completions", target.url()),
        )],
        "{}".into(),
    ));
    let gw = Gateway::start(&cfg(
        &[client_yaml(
            "c",
            &up.url(),
            &["sk-redirect"],
            "model_match: { type: exact, value: [m] }",
        )],
        "usage:\n  enabled: false\n",
    ))
    .await;
    let r = gw.chat("m").await;
    assert_eq!(r.status, 307);
    assert_eq!(
        target.count(),
        0,
        "the key never went to the redirect target"
    );
}

/// A TLS upstream whose certificate no public root signs.
async fn self_signed_upstream(dir: &Path) -> String {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                        .await;
                }
            });
        }
    });
    format!("https://127.0.0.1:{}/v1", addr.port())
}

#[tokio::test]
async fn a_tls_failure_fails_over_and_names_the_certificate_problem() {
    let dir = tempfile::tempdir().unwrap();
    let tls = self_signed_upstream(dir.path()).await;
    let ok = MockUpstream::start("ok").await;
    let gw = Gateway::start(&cfg(
        &[
            client_yaml(
                "selfsigned",
                &tls,
                &["k"],
                "priority: 1\nmodel_match: { type: keyword, value: [m] }",
            ),
            client_yaml(
                "ok",
                &ok.url(),
                &["k"],
                "priority: 2\nmodel_match: { type: keyword, value: [m] }",
            ),
        ],
        "usage:\n  dir: ./usage\n",
    ))
    .await;
    assert_eq!(gw.chat("m").await.status, 200);
    let only_tls = Gateway::start(&cfg(
        &[client_yaml(
            "selfsigned",
            &tls,
            &["k"],
            "model_match: { type: keyword, value: [m] }",
        )],
        "usage:\n  dir: ./usage\n",
    ))
    .await;
    let r = only_tls.chat("m").await;
    assert_eq!(r.status, 502);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
}

#[tokio::test]
async fn slow_callers_are_cut_off() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[one_client(&up, "")],
        "server:\n  header_read_timeout: 300ms\nusage:\n  enabled: false\n",
    ))
    .await;
    // Headers that never finish: the connection is closed.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "closed after header_read_timeout");

    // A body that stalls: 408.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    // Oversized headers: refused by the HTTP layer, nothing reaches an upstream.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let big = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}", "a".repeat(200_000));
    let _ = s.write_all(big.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_caller_that_leaves_mid_stream_gets_a_row_saying_so() {
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let events = (0..100)
        .map(|i| chat_chunk(&format!("{i}{}", "y".repeat(2000))))
        .collect();
    up.push(Reply::Sse {
        events,
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  dir: ./usage\n")).await;
    let mut resp = gw.stream("m").await;
    next_chunk(resp.body_mut()).await.unwrap().unwrap();
    drop(resp);
    gate.add_permits(100);
    assert!(eventually(Duration::from_secs(5), || up.cancelled_streams() == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dir = gw.stop().await;
    let rows = row_errors(dir.path());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 200, "headers had been sent");
    assert_eq!(rows[0].1.as_deref(), Some("caller closed the connection"));
}

#[tokio::test]
async fn the_caller_cannot_choose_the_upstream_host() {
    let up = MockUpstream::start("up").await;
    let elsewhere = MockUpstream::start("elsewhere").await;
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  enabled: false\n")).await;
    let body = r#"{"model":"m"}"#;
    // An absolute URL in the request line names another host: ignored.
    let req = format!(
        "POST http://{}/v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        elsewhere.addr,
        elsewhere.addr,
        body.len()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert_eq!((up.count(), elsewhere.count()), (1, 0));
    assert_eq!(
        up.requests()[0].headers["host"],
        up.addr.to_string().as_str()
    );
    // Traversal and encoded separators never leave base_url's path.
    for path in [
        "/c/v1/../../x",
        "/v1/chat/..%2f..%2fadmin",
        "/v1/chat%2Fcompletions",
        "/c/v1/%2e%2e/models",
        "/v1//chat",
        "/v1/a\\b",
    ] {
        let r = send(post_req(&gw.url(path), body, &[])).await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_instead_of_growing_memory() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[one_client(&up, "")],
        "server:\n  max_connections: 2\nusage:\n  enabled: false\n",
    ))
    .await;
    let a = TcpStream::connect(gw.addr).await.unwrap();
    let b = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A third connection is accepted by the kernel but not served yet.
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
    assert!(early.is_err(), "not served while two connections are open");
    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(b);
}

/// Workers share max_connections but each has its own socket, and the
/// kernel picks which one a connection reaches: a worker waiting to accept
/// must not hold a slot meanwhile, or another's connection waits for a
/// slot no connection uses.
#[tokio::test]
async fn a_worker_waiting_to_accept_holds_no_connection_slot() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[one_client(&up, "")],
        "server:\n  max_connections: 1\nusage:\n  enabled: false\n",
    ))
    .await;
    // A second worker on a socket of its own, sharing the state (and so
    // the slots) with the first, which gets no connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = gw.state.clone();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gptbalance::proxy::server::run(listener, state, async {
        let _ = stopped.await;
    }));
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
            .await
            .expect("served by the worker that accepted it")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    }
    // Still one at a time across both workers: the first worker's
    // connection waits while the second's is open.
    let held = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "not served while the other worker's connection is open"
    );
    drop(held);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_reader_holding_the_usage_file_does_not_stop_the_writer() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  dir: ./usage\n")).await;
    gw.chat("m").await;
    let path = gw
        .dir
        .path()
        .join(format!("usage/usage-{}.sqlite", month()));
    let (metrics, table) = (gw.state.metrics.clone(), gw.state.table.load_full());
    let written = "gptbalance_usage_rows_total{result=\"written\"} 1";
    assert!(
        eventually(Duration::from_secs(3), || metrics
            .render(&table.scrape())
            .contains(written))
        .await
    );
    let reader =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap();
    for _ in 0..20 {
        gw.chat("m").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = gw.state.metrics.render(&gw.state.table.load().scrape());
    assert!(!metrics.contains("result=\"dropped\""), "{metrics}");
    reader.execute_batch("COMMIT").unwrap();
    let total: i64 = reader
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!((n, total), (n, n + 20));
}

#[tokio::test]
async fn a_directory_or_unreadable_path_in_place_of_the_config_keeps_the_table() {
    let up = MockUpstream::start("up").await;
    let good = cfg(
        &[one_client(&up, "")],
        "usage:\n  enabled: false\nserver:\n  admin_token: a\n",
    );
    let gw = Gateway::start(&good).await;
    std::fs::remove_file(gw.config_path()).unwrap();
    std::fs::create_dir(gw.config_path()).unwrap();
    let status = gptbalance::ops::reload::reload_now(&gw.state, "test").await;
    assert!(!status.ok);
    assert!(
        status.errors[0].contains("cannot read the config file"),
        "{:?}",
        status.errors
    );
    assert_eq!(gw.generation(), 1);
    assert_eq!(gw.chat("m").await.status, 200);
}

#[tokio::test]
async fn a_thousand_connections_through_max_connections_100_are_all_served() {
    // The test process needs more than the default 1024 descriptors.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(
        &[one_client(&up, "")],
        "server:\n  max_connections: 100\nusage:\n  enabled: false\n",
    ))
    .await;
    let body = r#"{"model":"m"}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (addr, request) = (gw.addr, request.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<bool, String>(buf.starts_with(b"HTTP/1.1 200"))
        }));
    }
    let mut served = 0;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            == Ok(true)
        {
            served += 1;
        }
    }
    assert_eq!(served, 1000);
    assert_eq!(up.count(), 1000);
}

/// Sequential requests share one upstream connection; each carries the
/// upstream's `Host` and an origin-form request line.
#[tokio::test]
async fn upstream_connections_are_reused_with_host_and_origin_form() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&cfg(&[one_client(&up, "")], "usage:\n  enabled: false\n")).await;
    for _ in 0..20 {
        assert_eq!(gw.chat("m").await.status, 200);
    }
    // A stream read to its end gives its connection back too.
    up.push(Reply::Sse {
        events: vec![chat_chunk("hi"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let mut body = gw.stream("m").await.into_body();
    assert!(read_all(&mut body).await.unwrap().contains("[DONE]"));
    assert_eq!(gw.chat("m").await.status, 200);
    assert_eq!(up.count(), 22);
    assert_eq!(
        up.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let r = &up.requests()[0];
    assert_eq!(r.uri, "/v1/chat/completions");
    assert_eq!(r.headers["host"], up.addr.to_string().as_str());
}

/// An upstream that closes idle keep-alive connections after 30 ms: every
/// later request finds its pooled connection closed and opens a new one,
/// without an error, a failover or a cooled key.
#[tokio::test]
async fn idle_connections_the_upstream_closed_are_replaced_without_failing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") || !seen.ends_with(b"}") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let gw = Gateway::start(&cfg(
        &[client_yaml(
            "c",
            &format!("http://{addr}/v1"),
            &["k"],
            "max_failures: 1\nmodel_match: { type: exact, value: [m] }",
        )],
        "usage:\n  dir: ./usage\n",
    ))
    .await;
    for _ in 0..5 {
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    let dir = gw.stop().await;
    let rows = row_errors(dir.path());
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter().all(|(s, e)| *s == 200 && e.is_none()),
        "{rows:?}"
    );
}
