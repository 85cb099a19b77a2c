//! `server.tls`: the real binary listening with TLS on loopback, a client
//! that trusts a certificate made at test time, HTTP/1.1 and HTTP/2 (ALPN),
//! reloads that change or break the certificate, and `validate-config`.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

fn der(cert: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert).unwrap()
}

/// `gptbalance serve` on 127.0.0.1 port 0 in `dir`; killed on drop.
struct Served {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Served {
    fn start(dir: &Path) -> Served {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--config",
                "config.yaml",
                "--listen",
                "127.0.0.1:0",
            ])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    assert!(line.contains("tls=true"), "{line}");
                    let addr = rest.split_whitespace().next().unwrap().to_owned();
                    return Served { child, addr, lines };
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("serve did not report its address");
    }

    /// Log lines so far.
    fn log(&self) -> String {
        self.lines.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS connection to `addr` trusting only `trusted`, offering `alpn`.
async fn connect(
    addr: &str,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake within 10s")
    .expect("handshake")
}

/// The certificate the server presented on `tls`.
fn presented(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// An HTTP/1.1 keep-alive connection over `tls`.
async fn h1(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn request(addr: &str, method: &str, path: &str, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("https://{addr}{path}"))
        .header("host", addr)
        .header("content-type", "application/json")
        .header("authorization", "Bearer adm-token-for-tests")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// Sends on an HTTP/1.1 connection; status and whole body.
async fn send_h1(
    conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (u16, Bytes) {
    let mut req = req;
    // Origin form, as HTTP/1.1 clients send it.
    *req.uri_mut() = req.uri().path().parse().unwrap();
    conn.ready().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), conn.send_request(req))
        .await
        .expect("an answer within 20s")
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn chat_body() -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

fn stream_body() -> String {
    json!({"model": "m", "stream": true, "messages": []}).to_string()
}

/// The config: TLS from `tls/cert.pem` and `tls/key.pem`, relative to
/// the config file, one client on `up`.
fn config(up: &MockUpstream, tls: bool, extra_server: &str) -> String {
    let tls = if tls {
        "  tls:\n    cert: tls/cert.pem\n    key: tls/key.pem\n"
    } else {
        ""
    };
    format!(
        "server:\n  admin_token: adm-token-for-tests\n{tls}{extra_server}usage:\n  enabled: false\nopenai_clients:\n{}",
        one_client(up, "")
    )
}

/// Puts `cert` and `key` where the config reads them.
fn install(dir: &Path, (cert, key): &(PathBuf, PathBuf)) {
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::copy(cert, dir.join("tls/cert.pem")).unwrap();
    std::fs::copy(key, dir.join("tls/key.pem")).unwrap();
}

async fn reload(addr: &str, trusted: &CertificateDer<'static>) -> Value {
    let mut conn = h1(connect(addr, trusted, &[b"http/1.1"]).await).await;
    let (status, body) = send_h1(&mut conn, request(addr, "POST", "/admin/reload", "")).await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn http1_and_http2_over_tls_route_stream_and_serve_the_admin_endpoints() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let made = make_cert(dir.path(), "gateway-one", 1);
    install(dir.path(), &made);
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, "")).unwrap();
    let served = Served::start(dir.path());
    let addr = served.addr.clone();
    let trusted = der(&made.0);

    // HTTP/1.1 (ALPN http/1.1): two requests on one connection.
    let tls = connect(&addr, &trusted, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let tls = connect(&addr, &trusted, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(presented(&tls), trusted);
    let mut conn = h1(tls).await;
    for _ in 0..2 {
        let (status, body) = send_h1(
            &mut conn,
            request(&addr, "POST", "/v1/chat/completions", &chat_body()),
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
        let reply: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["model"], "m", "{reply}");
    }
    assert_eq!(up.count(), 2);
    assert!(up
        .requests()
        .iter()
        .all(|r| r.json()["model"] == "m" && r.auth() == "Bearer k"));

    // A stream over HTTP/1.1, chunk by chunk.
    up.push(Reply::Sse {
        events: vec![chat_chunk("one"), chat_chunk("two"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    conn.ready().await.unwrap();
    let mut req = request(&addr, "POST", "/v1/chat/completions", &stream_body());
    *req.uri_mut() = "/v1/chat/completions".parse().unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = read_all(&mut resp.into_body()).await.unwrap();
    assert!(
        text.contains("\"one\"") && text.contains("\"two\"") && text.ends_with(DONE),
        "{text}"
    );

    // HTTP/2 (ALPN h2): a completion and a stream on one connection.
    let tls = connect(&addr, &trusted, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(h2_conn);
    let resp = h2
        .send_request(request(&addr, "POST", "/v1/chat/completions", &chat_body()))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["model"],
        "m"
    );
    up.push(Reply::Sse {
        events: vec![chat_chunk("three"), DONE.to_owned()],
        gate: None,
        abort_at_end: false,
    });
    let resp = h2
        .send_request(request(
            &addr,
            "POST",
            "/v1/chat/completions",
            &stream_body(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = read_all(&mut resp.into_body()).await.unwrap();
    assert!(text.contains("\"three\"") && text.ends_with(DONE), "{text}");
    assert_eq!(up.count(), 5);

    // The admin endpoints and /metrics are on the same listener.
    let resp = h2
        .send_request(request(&addr, "GET", "/metrics", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = h2
        .send_request(request(&addr, "GET", "/admin/config", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let effective: Value = serde_json::from_slice(&body).unwrap();
    let tls_cfg = &effective["server"]["tls"];
    assert!(
        tls_cfg["cert"].as_str().unwrap().ends_with("/tls/cert.pem"),
        "{tls_cfg}"
    );
    assert!(
        tls_cfg["key"].as_str().unwrap().ends_with("/tls/key.pem"),
        "{tls_cfg}"
    );
    assert!(
        !String::from_utf8_lossy(&body).contains("PRIVATE KEY"),
        "{effective}"
    );

    // Plain HTTP to the TLS port: no HTTP answer, nothing routed, closed.
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    let body = chat_body();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    plain.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got))
        .await
        .expect("the gateway closes a plain connection on its TLS port");
    assert!(
        read.is_err() || !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(up.count(), 5);
    drop(served);
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_closed_after_header_read_timeout() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let made = make_cert(dir.path(), "gateway-one", 1);
    install(dir.path(), &made);
    let extra = "  header_read_timeout: 1s\n";
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, extra)).unwrap();
    let served = Served::start(dir.path());
    let trusted = der(&made.0);

    // TCP open, no ClientHello: the gateway closes it (and the task that
    // held its connection slot ends).
    let mut silent = TcpStream::connect(&served.addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut got))
        .await
        .expect("the silent connection is closed");
    assert!(read.is_err() || got.is_empty(), "{got:?}");

    // A real client is served as usual.
    let mut conn = h1(connect(&served.addr, &trusted, &[b"http/1.1"]).await).await;
    let (status, _) = send_h1(
        &mut conn,
        request(&served.addr, "POST", "/v1/chat/completions", &chat_body()),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections_and_refuses_a_broken_key() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let one = make_cert(dir.path(), "gateway-one", 1);
    let two = make_cert(dir.path(), "gateway-two", 2);
    let other = make_cert(dir.path(), "unrelated", 3);
    install(dir.path(), &one);
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, "")).unwrap();
    let served = Served::start(dir.path());
    let addr = served.addr.clone();
    let (first, second) = (der(&one.0), der(&two.0));
    assert_ne!(first, second);

    // A keep-alive connection made with the first certificate.
    let tls = connect(&addr, &first, &[b"http/1.1"]).await;
    assert_eq!(presented(&tls), first);
    let mut old = h1(tls).await;
    let chat = || request(&addr, "POST", "/v1/chat/completions", &chat_body());
    assert_eq!(send_h1(&mut old, chat()).await.0, 200);

    // New files, then a reload: new connections get the second one.
    install(dir.path(), &two);
    let status = reload(&addr, &first).await;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    let tls = connect(&addr, &second, &[b"http/1.1"]).await;
    assert_eq!(presented(&tls), second);
    let mut fresh = h1(tls).await;
    assert_eq!(send_h1(&mut fresh, chat()).await.0, 200);
    // The old connection still works, still the same connection.
    assert_eq!(send_h1(&mut old, chat()).await.0, 200);

    // A key that does not match the certificate: refused, named, and
    // new connections keep getting the second certificate.
    std::fs::copy(&other.1, dir.path().join("tls/key.pem")).unwrap();
    let status = reload(&addr, &second).await;
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    let errors = status["last_reload"]["errors"].to_string();
    assert!(
        errors.contains("tls/key.pem") && errors.contains("does not match the certificate"),
        "{errors}"
    );
    assert!(
        !errors.contains("PRIVATE"),
        "no key content in errors: {errors}"
    );
    let tls = connect(&addr, &second, &[b"http/1.1"]).await;
    assert_eq!(presented(&tls), second);
    let mut after = h1(tls).await;
    assert_eq!(send_h1(&mut after, chat()).await.0, 200);

    // A reload without `server.tls`: applied, with a warning, and the
    // listener still speaks TLS with the certificate it has.
    install(dir.path(), &two);
    std::fs::write(dir.path().join("config.yaml"), config(&up, false, "")).unwrap();
    let status = reload(&addr, &second).await;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    let tls = connect(&addr, &second, &[b"h2", b"http/1.1"]).await;
    assert_eq!(presented(&tls), second);
    assert!(
        eventually(Duration::from_secs(5), || served
            .log()
            .contains("server.tls was removed"))
        .await
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_reload_being_asked() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let one = make_cert(dir.path(), "gateway-one", 1);
    let two = make_cert(dir.path(), "gateway-two", 2);
    install(dir.path(), &one);
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, "")).unwrap();
    let served = Served::start(dir.path());
    let addr = served.addr.clone();
    let (first, second) = (der(&one.0), der(&two.0));
    assert_eq!(
        presented(&connect(&addr, &first, &[b"http/1.1"]).await),
        first
    );

    // What certbot's deploy step does: new files in place, nothing else.
    install(dir.path(), &two);
    let renewed = eventually(Duration::from_secs(10), || {
        served.log().contains("config reloaded")
    })
    .await;
    assert!(renewed, "the certificate files' change reloaded");
    let tls = connect(&addr, &second, &[b"http/1.1"]).await;
    assert_eq!(presented(&tls), second);
    let mut conn = h1(tls).await;
    let chat = request(&addr, "POST", "/v1/chat/completions", &chat_body());
    assert_eq!(send_h1(&mut conn, chat).await.0, 200);
}

#[tokio::test]
async fn idle_tls_connections_close_after_keepalive_timeout_but_not_mid_request() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let made = make_cert(dir.path(), "gateway-one", 1);
    install(dir.path(), &made);
    // The header wait is long: only keepalive_timeout can close these.
    let extra = "  keepalive_timeout: 1s\n  header_read_timeout: 60s\n";
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, extra)).unwrap();
    let served = Served::start(dir.path());
    let addr = served.addr.clone();
    let trusted = der(&made.0);
    let chat = || request(&addr, "POST", "/v1/chat/completions", &chat_body());

    // HTTP/1.1: a request that takes 2.5 s (longer than the timeout) is
    // answered; the connection then closes on its own about 1 s later.
    let tls = connect(&addr, &trusted, &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(conn);
    up.push(Reply::Delay(Duration::from_millis(2500)));
    assert_eq!(send_h1(&mut send, chat()).await.0, 200);
    let closed = tokio::time::timeout(Duration::from_secs(10), h1_conn).await;
    assert!(
        closed.is_ok(),
        "idle HTTP/1.1 over TLS closed by keepalive_timeout"
    );

    // HTTP/2: the same, the connection ends with GOAWAY once idle.
    let tls = connect(&addr, &trusted, &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let h2_conn = tokio::spawn(conn);
    up.push(Reply::Delay(Duration::from_millis(2500)));
    let resp = h2.send_request(chat()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), h2_conn).await;
    assert!(closed.is_ok(), "idle HTTP/2 closed by keepalive_timeout");
}

#[tokio::test]
async fn health_probes_a_tls_gateway_verifying_its_certificate() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let made = make_cert(dir.path(), "gateway-one", 1);
    let other = make_cert(dir.path(), "unrelated", 2);
    install(dir.path(), &made);
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, "")).unwrap();
    let served = Served::start(dir.path());
    let url = format!("https://{}/readyz", served.addr);
    let health = |args: Vec<String>| {
        let dir = dir.path().to_owned();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new(BIN)
                    .arg("health")
                    .args(&args)
                    .current_dir(&dir)
                    .output()
                    .unwrap();
                (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned()
                        + &String::from_utf8_lossy(&out.stderr),
                )
            })
            .await
            .unwrap()
        }
    };
    let args = |extra: &[&str]| {
        let mut v = vec!["--url".to_owned(), url.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Trusting the gateway's own certificate: healthy.
    let (code, out) = health(args(&["--ca", "tls/cert.pem"])).await;
    assert_eq!((code, out.as_str()), (0, format!("{url}: 200\n").as_str()));
    // The public roots do not know a self-signed certificate: unhealthy.
    let (code, out) = health(args(&[])).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("certificate"), "{out}");
    // Nor does an unrelated one.
    let (code, _) = health(args(&["--ca", other.0.to_str().unwrap()])).await;
    assert_eq!(code, 1);
    // --insecure asks only whether it answers.
    let (code, out) = health(args(&["--insecure"])).await;
    assert_eq!(code, 0, "{out}");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = format!("http://{}/readyz", served.addr);
    let (code, _) = health(vec!["--url".into(), plain.clone()]).await;
    assert_eq!(code, 1);
    // Usage errors: 2.
    let (code, out) = health(vec!["--url".into(), plain, "--insecure".into()]).await;
    assert_eq!(code, 2, "{out}");
    let (code, out) = health(args(&["--ca", "no-such.pem"])).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no-such.pem"), "{out}");
}

#[tokio::test]
async fn a_tls_stream_in_flight_finishes_when_the_gateway_drains() {
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let made = make_cert(dir.path(), "gateway-one", 1);
    install(dir.path(), &made);
    std::fs::write(dir.path().join("config.yaml"), config(&up, true, "")).unwrap();
    let mut served = Served::start(dir.path());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    up.push(Reply::Sse {
        events: vec![chat_chunk("before"), chat_chunk("after"), DONE.to_owned()],
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let tls = connect(&served.addr, &der(&made.0), &[b"h2"]).await;
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(h2_conn);
    let resp = h2
        .send_request(request(
            &served.addr,
            "POST",
            "/v1/chat/completions",
            &stream_body(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = next_chunk(&mut body).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("before"));

    // SIGTERM: the gateway drains; the stream still ends whole.
    let pid = served.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    assert!(
        eventually(Duration::from_secs(5), || served.log().contains("draining")).await,
        "the gateway drains"
    );
    gate.add_permits(2);
    let rest = read_all(&mut body).await.unwrap();
    assert!(rest.contains("after") && rest.ends_with(DONE), "{rest}");
    let exited = tokio::task::spawn_blocking(move || {
        let status = served.child.wait().unwrap();
        (status, served)
    })
    .await
    .unwrap();
    assert_eq!(exited.0.code(), Some(0));
}

#[test]
fn validate_config_names_a_missing_or_mismatched_tls_file() {
    let dir = tempfile::tempdir().unwrap();
    let config_text = "server:\n  tls:\n    cert: certs/missing.pem\n    key: certs/key.pem\nusage:\n  enabled: false\nopenai_clients:\n  - name: c\n    base_url: \"http://127.0.0.1:9/v1\"\n    api_key: k\n    model_match: { type: exact, value: [m] }\n";
    std::fs::write(dir.path().join("config.yaml"), config_text).unwrap();
    let out = Command::new(BIN)
        .args(["validate-config", "--config", "config.yaml"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("config.yaml:3:11: server.tls.cert: cannot read `certs/missing.pem`"),
        "{text}"
    );

    // Both files there, but the key is another certificate's.
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    let one = make_cert(&dir.path().join("certs"), "one", 1);
    let other = make_cert(&dir.path().join("certs"), "other", 2);
    std::fs::copy(&one.0, dir.path().join("certs/missing.pem")).unwrap();
    std::fs::copy(&other.1, dir.path().join("certs/key.pem")).unwrap();
    let out = Command::new(BIN)
        .args(["validate-config", "--config", "config.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("config.yaml:4:10: server.tls.key: `certs/key.pem` does not match the certificate in `certs/missing.pem`"),
        "{text}"
    );

    // The right key: valid. A misspelt key gets a suggestion.
    std::fs::copy(&one.1, dir.path().join("certs/key.pem")).unwrap();
    let out = Command::new(BIN)
        .args(["validate-config", "--config", "config.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.path().join("config.yaml"),
        config_text.replace("    key:", "    keyy:"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate-config", "--config", "config.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("config.yaml:4:5: unknown key `keyy` (did you mean `key`?)"),
        "{text}"
    );
}
