//! The hand-written HTTP/1 paths on the wire: raw bytes from a caller into
//! the real server, raw bytes back from a scripted upstream, every byte on
//! both sides looked at. One test per defect found by a black-box probe
//! (issue 19), and a differential test that sends the same bytes to the
//! fast path and to the hyper path and compares what comes out.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted upstream does, in order, for one request.
#[derive(Clone, Debug)]
enum Act {
    /// Reads the request body (`Content-Length` or chunked) and records it.
    ReadBody,
    Write(Vec<u8>),
    Pause(Duration),
    /// Closes the connection (FIN).
    Close,
}

fn write(bytes: impl AsRef<[u8]>) -> Act {
    Act::Write(bytes.as_ref().to_vec())
}

/// The usual plan: read the body, then write `answer` and keep the
/// connection for the next request.
fn answer(bytes: impl AsRef<[u8]>) -> Vec<Act> {
    vec![Act::ReadBody, write(bytes)]
}

type Script = Arc<dyn Fn(&[u8]) -> Vec<Act> + Send + Sync>;

/// An upstream on loopback that reads requests byte-exactly and answers
/// each as `script` says, given the request head.
struct RawUpstream {
    url: String,
    /// Every request as it arrived: head and body bytes.
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    async fn start(script: impl Fn(&[u8]) -> Vec<Act> + Send + Sync + 'static) -> RawUpstream {
        RawUpstream::start_on(false, script).await
    }

    /// Plain, or behind TLS (HTTP/1.1, the test certificate) when `tls`.
    async fn start_on(
        tls: bool,
        script: impl Fn(&[u8]) -> Vec<Act> + Send + Sync + 'static,
    ) -> RawUpstream {
        use tokio_rustls::rustls;
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let acceptor = tls.then(|| {
            let (cert, key) = test_certificate();
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .unwrap();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (script, log) = (script.clone(), log.clone());
                match acceptor.clone() {
                    None => {
                        tokio::spawn(serve_raw(s, script, log));
                    }
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(s).await {
                                serve_raw(tls, script, log).await;
                            }
                        });
                    }
                }
            }
        });
        let scheme = if tls { "https" } else { "http" };
        RawUpstream {
            url: format!("{scheme}://{addr}/v1"),
            seen,
        }
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// Either side of a raw upstream's connection, plain or TLS.
trait Wire: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Wire for T {}

async fn serve_raw(mut s: impl Wire, script: Script, log: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until_head_end(&mut s, &mut buf).await else {
            return;
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let at = {
            let mut l = log.lock().unwrap();
            l.push(head.clone());
            l.len() - 1
        };
        for act in script(&head) {
            match act {
                Act::ReadBody => {
                    let Some(body) = read_body(&mut s, &mut buf, &head).await else {
                        return;
                    };
                    log.lock().unwrap()[at].extend_from_slice(&body);
                }
                Act::Write(bytes) => {
                    if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Act::Pause(d) => tokio::time::sleep(d).await,
                Act::Close => return,
            }
        }
    }
}

/// Reads until `buf` holds a whole head; its length, or `None` at the end.
async fn read_until_head_end(s: &mut impl Wire, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head).ok()?.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a request body framed as `head` says (as it came on the wire).
async fn read_body(s: &mut impl Wire, buf: &mut Vec<u8>, head: &[u8]) -> Option<Vec<u8>> {
    let want = if header(head, "transfer-encoding").is_some() {
        // Chunked: read to the last chunk (no trailers in these tests).
        loop {
            if let Some(at) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                break at + 5;
            }
            fill(s, buf).await?;
        }
    } else {
        header(head, "content-length").map_or(0, |v| v.parse().unwrap_or(0))
    };
    while buf.len() < want {
        fill(s, buf).await?;
    }
    Some(buf.drain(..want).collect())
}

async fn fill(s: &mut impl Wire, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 64 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// A response as a caller's socket saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: u16,
    /// Lowercase name, value; in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// How the body was framed: `length`, `chunked`, `close` or `none`.
    framing: &'static str,
}

impl Seen {
    fn get(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How a caller's read of a response ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The body ended as framed.
    Framed,
    /// The connection closed (FIN).
    Fin,
    /// The connection was reset (RST).
    Reset,
}

/// Reads one response from `s`. `head_request`: no body follows.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> (Seen, End) {
    tokio::time::timeout(
        Duration::from_secs(20),
        read_response_now(s, buf, head_request),
    )
    .await
    .expect("a response within 20 s")
}

async fn read_response_now(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (Seen, End) {
    let (status, headers, len) = loop {
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut slots);
        if let Ok(httparse::Status::Complete(len)) = resp.parse(buf) {
            let code = resp.code.unwrap();
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            if (100..200).contains(&code) && code != 101 {
                buf.drain(..len);
                continue;
            }
            break (code, headers, len);
        }
        match read_more(s, buf).await {
            Ok(true) => {}
            Ok(false) => panic!("closed before a response head: {:?}", lossy(buf)),
            Err(e) => panic!("{e} before a response head: {:?}", lossy(buf)),
        }
    };
    buf.drain(..len);
    let mut seen = Seen {
        status,
        headers,
        body: Vec::new(),
        framing: "none",
    };
    let length = seen
        .get("content-length")
        .first()
        .map(|v| v.parse::<usize>().unwrap());
    let chunked = !seen.get("transfer-encoding").is_empty();
    if head_request || status == 204 || status == 304 {
        return (seen, End::Framed);
    }
    let end = if chunked {
        seen.framing = "chunked";
        loop {
            match dechunk(buf) {
                Some((body, used)) => {
                    seen.body = body;
                    buf.drain(..used);
                    break End::Framed;
                }
                None => match read_more(s, buf).await {
                    Ok(true) => {}
                    Ok(false) => break End::Fin,
                    Err(_) => break End::Reset,
                },
            }
        }
    } else if let Some(n) = length {
        seen.framing = "length";
        loop {
            if buf.len() >= n {
                seen.body = buf.drain(..n).collect();
                break End::Framed;
            }
            match read_more(s, buf).await {
                Ok(true) => {}
                Ok(false) => break End::Fin,
                Err(_) => break End::Reset,
            }
        }
    } else {
        seen.framing = "close";
        loop {
            match read_more(s, buf).await {
                Ok(true) => {}
                Ok(false) => break End::Fin,
                Err(_) => break End::Reset,
            }
        }
    };
    if seen.body.is_empty() && end != End::Framed {
        seen.body = std::mem::take(buf);
    }
    (seen, end)
}

/// A chunked body decoded from the front of `buf` and the bytes it took,
/// or `None` when it is not all there.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&buf[at..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // No trailers from gptbalance.
            return (buf.len() >= at + 2).then_some((body, at + 2));
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// Reads once more: `Ok(false)` at a clean end, `Err` on a reset.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 64 * 1024];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sends `request` on a new connection and reads one response.
async fn exchange(gw: &Gateway, request: &[u8], head_request: bool) -> (Seen, End) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    read_response(&mut s, &mut buf, head_request).await
}

/// A gateway with client `c` (keys `k1`, `k2`, serving model `m`) at `url`.
async fn gateway(url: &str, server: &str, policy: &str) -> Gateway {
    Gateway::start(&format!(
        "server:\n{server}\nrouting:\n  retry_on: [500, 502, 503]\n{policy}\nusage:\n  enabled: false\nopenai_clients:\n{}",
        client_yaml(
            "c",
            url,
            &["k1", "k2"],
            "model_match: { type: exact, value: [m] }"
        )
    ))
    .await
}

const CHAT: &str = r#"{"model":"m","messages":[]}"#;

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn ok_json(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const COMPLETION: &str = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

/// Item 1: an answer with no body by definition (to HEAD, 204, 304, a
/// chunked body of no chunks, `Content-Length: 0`) is never a key failure,
/// whatever the method on the pinned path; three of them with
/// `max_failures: 1` would otherwise cool every key down.
#[tokio::test]
async fn bodiless_answers_never_count_against_a_key() {
    let up = RawUpstream::start(|head| {
        let method = std::str::from_utf8(head)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let reply: &[u8] = match method {
            // A correct answer to HEAD: the length a GET would have.
            "HEAD" => {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 197\r\n\r\n"
            }
            "GET" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "PUT" => b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n",
            "DELETE" => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "PATCH" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "OPTIONS" => {
                return vec![
                    Act::ReadBody,
                    write("HTTP/1.1 100 Continue\r\n\r\n"),
                    Act::Pause(Duration::from_millis(10)),
                    write("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"),
                    Act::Close,
                ]
            }
            _ => return answer(ok_json(COMPLETION)),
        };
        answer(reply)
    })
    .await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "  max_failures: 1").await;
    for method in ["HEAD", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for _ in 0..3 {
            let req = format!("{method} /c/v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
            let (seen, _) = exchange(&gw, req.as_bytes(), method == "HEAD").await;
            let want = match method {
                "HEAD" | "DELETE" | "PATCH" => 200,
                "PUT" => 304,
                _ => 204,
            };
            assert_eq!(seen.status, want, "{method}: {seen:?}");
            if method == "HEAD" {
                assert_eq!(seen.get("content-length"), ["197"], "{seen:?}");
            }
        }
    }
    // Each went upstream once, by its own method.
    assert_eq!(up.count(), 18);
    assert!(up.requests()[0].starts_with(b"HEAD /v1/models HTTP/1.1\r\n"));
    // Every key is still healthy: the next chat completion is served.
    let (seen, _) = exchange(&gw, &post("/v1/chat/completions", CHAT), false).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    let table = gw.state.table.load();
    for key in &table.clients[0].keys {
        assert_eq!(key.health.failures(), 0, "{}", key.id);
    }
}

/// Reads until the caller's connection closes: true for a FIN or a reset
/// within 20 s, what came meanwhile in `rest`.
async fn closes(s: &mut TcpStream, rest: &mut Vec<u8>) -> bool {
    let read = async {
        loop {
            match read_more(s, rest).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .is_ok()
}

const CL_TE: &[u8] = b"POST /c/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

/// Item 2: after a request the framing watcher used to stop following (an
/// `Upgrade`, bare-LF line ends, empty lines before a request line), a
/// request with both `Content-Length` and `Transfer-Encoding` still gets
/// 400 and a close, and never reaches an upstream; a CONNECT gets 405 and
/// a close.
#[tokio::test]
async fn conflicting_framing_after_odd_heads_is_refused() {
    let up = RawUpstream::start(|_| answer(ok_json(COMPLETION))).await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "").await;
    let firsts: [&[u8]; 4] = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
        b"OPTIONS /healthz HTTP/1.1\nHost: x\n\n",
        b"GET /healthz HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n0\r\n\r\n",
        b"OPTIONS /healthz HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\n",
    ];
    for first in firsts {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&[first, CL_TE].concat()).await.unwrap();
        let mut buf = Vec::new();
        let (seen, _) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(seen.status, 200, "{:?}: {seen:?}", lossy(first));
        let (seen, _) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(seen.status, 400, "{:?}: {seen:?}", lossy(first));
        assert!(closes(&mut s, &mut buf).await, "{:?}", lossy(first));
    }
    assert_eq!(up.count(), 0);

    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"CONNECT /c/v1/x HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (seen, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(seen.status, 405, "{seen:?}");
    assert!(closes(&mut s, &mut buf).await);
    assert!(
        buf.is_empty(),
        "nothing after the CONNECT: {:?}",
        lossy(&buf)
    );
    assert_eq!(up.count(), 0);
}

/// Item 5: a connection that sends nothing is closed after
/// `header_read_timeout`, an idle keep-alive one after `keepalive_timeout`
/// (which alone bounds the wait for a next request), on the fast path.
#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let up = RawUpstream::start(|_| answer(ok_json(COMPLETION))).await;
    let gw = gateway(
        &up.url,
        "  listen: 127.0.0.1:0\n  header_read_timeout: 300ms\n  keepalive_timeout: 700ms",
        "",
    )
    .await;
    // Nothing sent at all.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut rest = Vec::new();
    assert!(closes(&mut s, &mut rest).await);
    assert!(rest.is_empty());

    // Idle after a response.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.0.status, 200);
    assert!(closes(&mut s, &mut buf).await);
    assert!(buf.is_empty());

    // The wait for a next request is keepalive_timeout's, not
    // header_read_timeout's.
    let gw = gateway(
        &up.url,
        "  listen: 127.0.0.1:0\n  header_read_timeout: 200ms\n  keepalive_timeout: 60s",
        "",
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s, &mut buf, false).await.0.status, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // A head that begins must still finish within header_read_timeout.
    s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    assert!(closes(&mut s, &mut buf).await);
    assert!(buf.is_empty(), "{:?}", lossy(&buf));
}

/// Item 3: an upstream that sends an unasked `100 Continue` right after the
/// request head and reads the body only later still gets the whole body,
/// and the caller its answer.
#[tokio::test]
async fn an_unasked_100_continue_does_not_stall_a_large_upload() {
    let up = RawUpstream::start(|_| {
        vec![
            write("HTTP/1.1 100 Continue\r\n\r\n"),
            Act::Pause(Duration::from_millis(300)),
            Act::ReadBody,
            write(ok_json(COMPLETION)),
        ]
    })
    .await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "  request_timeout: 10s").await;
    let body = "a".repeat(8 << 20);
    let (seen, _) = exchange(&gw, &post("/c/v1/chat/completions", &body), false).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].ends_with(body.as_bytes()));
    let table = gw.state.table.load();
    assert!(table.clients[0]
        .keys
        .iter()
        .all(|k| k.health.failures() == 0));
}

/// Item 4: an upstream that dies mid-body aborts the caller's response
/// with a reset (RST), never a FIN that an HTTP/1.0 caller (or any caller
/// reading to the close) would take for a complete body: on the fast path
/// (HTTP/1.1) and on hyper's (HTTP/1.0).
#[tokio::test]
async fn an_aborted_response_ends_in_a_reset_for_every_caller() {
    let event = "data: {\"choices\":[]}\n\n";
    let cut = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
        event.len()
    );
    let up = RawUpstream::start(move |_| {
        vec![
            Act::ReadBody,
            write(&cut),
            Act::Pause(Duration::from_millis(50)),
            Act::Close,
        ]
    })
    .await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "").await;
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let req = format!(
            "POST /v1/chat/completions {version}\r\nHost: x\r\nContent-Length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        );
        let (seen, end) = exchange(&gw, req.as_bytes(), false).await;
        assert_eq!(seen.status, 200, "{version}: {seen:?}");
        assert_eq!(end, End::Reset, "{version}: {seen:?}");
        let want = if version == "HTTP/1.0" {
            "close"
        } else {
            "chunked"
        };
        assert_eq!(seen.framing, want);
        assert!(lossy(&seen.body).contains("data: {"), "{seen:?}");
    }
}

/// The first request of a connection that the fast path serves, and one
/// that hands the connection to hyper (another method): whatever follows
/// on that connection is served by that path.
const FAST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
const HYPER: &[u8] = b"OPTIONS /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// Sends `request` after `preamble` on one connection; the response to it.
async fn after(gw: &Gateway, preamble: &[u8], request: &[u8], head_request: bool) -> (Seen, End) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[preamble, request].concat()).await.unwrap();
    let mut buf = Vec::new();
    let (first, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(first.status, 200, "{first:?}");
    read_response(&mut s, &mut buf, head_request).await
}

/// The response to `request` on the fast path and on hyper's.
async fn on_both_paths(gw: &Gateway, request: &[u8]) -> [(Seen, End); 2] {
    [
        after(gw, FAST, request, false).await,
        after(gw, HYPER, request, false).await,
    ]
}

/// Items 10, 11 and 7: an upstream's repeated `Content-Length`, a length
/// on a 204, the headers its `Connection` header names and
/// `Proxy-Authenticate` reach the caller the same way on both caller paths
/// and from both upstream backends (plain, TLS): once, not at all, not at
/// all; the rest, quota headers included, as sent.
#[tokio::test]
async fn response_headers_get_one_policy_on_both_paths() {
    for tls in [false, true] {
        response_headers_get_one_policy(tls).await;
    }
}

async fn response_headers_get_one_policy(tls: bool) {
    let up = RawUpstream::start_on(tls, |head| {
        let path = std::str::from_utf8(head).unwrap().split(' ').nth(1).unwrap().to_owned();
        let reply = match path.as_str() {
            "/v1/twice" => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\nContent-Length: {n}\r\n\r\n{COMPLETION}",
                n = COMPLETION.len()
            ),
            "/v1/nothing" => "HTTP/1.1 204 No Content\r\ncontent-length: 30\r\n\r\n".to_owned(),
            _ => format!(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: s\r\nProxy-Authenticate: Basic realm=x\r\nKeep-Alive: timeout=5\r\nx-ratelimit-remaining-requests: 7\r\nx-kept: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{COMPLETION}",
                COMPLETION.len()
            ),
        };
        answer(reply)
    })
    .await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "").await;
    for (seen, end) in on_both_paths(&gw, &post("/c/v1/twice", CHAT)).await {
        assert_eq!((seen.status, end), (200, End::Framed), "{seen:?}");
        let n = COMPLETION.len().to_string();
        assert_eq!(seen.get("content-length"), [n.as_str()], "{seen:?}");
        assert_eq!(seen.body, COMPLETION.as_bytes());
    }
    for (seen, _) in on_both_paths(&gw, &post("/c/v1/nothing", CHAT)).await {
        assert_eq!(seen.status, 204, "{seen:?}");
        assert!(seen.get("content-length").is_empty(), "{seen:?}");
        assert!(seen.get("transfer-encoding").is_empty(), "{seen:?}");
    }
    for (seen, _) in on_both_paths(&gw, &post("/c/v1/hop", CHAT)).await {
        assert_eq!(seen.status, 200, "{seen:?}");
        for gone in ["x-hop-secret", "proxy-authenticate", "keep-alive"] {
            assert!(seen.get(gone).is_empty(), "{gone}: {seen:?}");
        }
        assert!(!seen.get("connection").iter().any(|v| v.contains("Hop")));
        assert_eq!(seen.get("x-ratelimit-remaining-requests"), ["7"]);
        assert_eq!(seen.get("x-kept"), ["1"]);
    }
}

/// Items 12 and 14: a response head over 64 KiB, however it is read, and
/// a transfer coding other than chunked (which would be stripped and its
/// body relayed still encoded) are upstream failures: 502, from a plain
/// upstream and from a TLS one.
#[tokio::test]
async fn oversized_heads_and_foreign_codings_are_upstream_errors() {
    for tls in [false, true] {
        oversized_heads_and_foreign_codings(tls).await;
    }
}

async fn oversized_heads_and_foreign_codings(tls: bool) {
    let up = RawUpstream::start_on(tls, |head| {
        let path = std::str::from_utf8(head).unwrap().split(' ').nth(1).unwrap().to_owned();
        let reply = match path.strip_prefix("/v1/huge-") {
            Some(n) => format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{COMPLETION}",
                "v".repeat(n.parse().unwrap()),
                COMPLETION.len()
            ),
            None => match path.as_str() {
            "/v1/gzip" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip\r\n\r\ngzipped-bytes".to_owned(),
            _ => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n".to_owned(),
            },
        };
        // In two writes: a head read in several pieces, the last of which
        // lands in a buffer already grown past 64 KiB.
        let (a, b) = reply.as_bytes().split_at(reply.len().min(63_000));
        vec![
            Act::ReadBody,
            write(a),
            Act::Pause(Duration::from_millis(20)),
            write(b),
            Act::Close,
        ]
    })
    .await;
    let gw = gateway(&up.url, "  listen: 127.0.0.1:0", "  max_failures: 1000").await;
    let sizes = [65_600, 70_000, 100_000].map(|n| format!("/c/v1/huge-{n}"));
    let paths: Vec<String> = sizes
        .into_iter()
        .chain(["/c/v1/gzip".into(), "/c/v1/gzip-chunked".into()])
        .collect();
    for path in &paths {
        let path = path.as_str();
        for (seen, _) in on_both_paths(&gw, &post(path, CHAT)).await {
            let text = lossy(&seen.body);
            assert_eq!(seen.status, 502, "{path}: {text}");
            assert!(
                text.contains("too large") || text.contains("transfer coding"),
                "{path}: {text}"
            );
        }
    }
}

/// What a caller and the upstream saw of one request on one path.
#[derive(Debug, PartialEq)]
struct Observed {
    status: u16,
    /// Every response header but `date` and `x-request-id`, sorted.
    headers: Vec<(String, String)>,
    framing: &'static str,
    body: Vec<u8>,
    /// Whether the connection took a next request after this one.
    kept_open: bool,
    /// The requests the upstream received, byte for byte.
    upstream: Vec<Vec<u8>>,
}

/// Sends `request` after `preamble`, then a `GET /healthz`, all at once on
/// one connection; what came back for `request` and what the upstream got.
async fn observe(gw: &Gateway, up: &RawUpstream, preamble: &[u8], request: &[u8]) -> Observed {
    let before = up.count();
    let next = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[preamble, request, next].concat())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (first, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(first.status, 200, "{first:?}");
    let head_request = request.starts_with(b"HEAD ");
    let (seen, end) = read_response(&mut s, &mut buf, head_request).await;
    let kept_open = end == End::Framed && {
        let third = async {
            loop {
                if buf.starts_with(b"HTTP/1.1 200") {
                    return true;
                }
                match read_more(&mut s, &mut buf).await {
                    Ok(true) => {}
                    _ => return buf.starts_with(b"HTTP/1.1 200"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), third)
            .await
            .expect("an answer or a close within 20 s")
    };
    // The one difference left between the paths (see the README's faults
    // table): a connection closed after a request whose body was not read
    // says `Connection: close` on the fast path only.
    let mut headers: Vec<(String, String)> = seen
        .headers
        .into_iter()
        .filter(|(n, _)| n != "date" && n != "x-request-id")
        .filter(|(n, v)| kept_open || !(n == "connection" && v == "close"))
        .collect();
    headers.sort();
    Observed {
        status: seen.status,
        headers,
        framing: seen.framing,
        body: seen.body,
        kept_open,
        upstream: up.requests()[before..].to_vec(),
    }
}

/// The gateway and upstream of the differential test: one client with one
/// key, so both paths send the same bytes upstream.
async fn differential_pair() -> (Gateway, RawUpstream) {
    let up = RawUpstream::start(|_| answer(ok_json(COMPLETION))).await;
    let gw = Gateway::start(&format!(
        "server:\n  max_body_bytes: 65536\nusage:\n  enabled: false\nopenai_clients:\n{}",
        client_yaml(
            "c",
            &up.url,
            &["k"],
            "model_match: { type: exact, value: [m] }"
        )
    ))
    .await;
    (gw, up)
}

/// The same request bytes to the fast path and to hyper's give the same
/// status, caller-visible framing, body and connection fate, and the same
/// bytes upstream; a corpus of tricky requests.
#[tokio::test]
async fn both_paths_answer_tricky_requests_alike() {
    let (gw, up) = differential_pair().await;
    let chat = CHAT.len();
    let corpus: Vec<Vec<u8>> = vec![
        post("/v1/chat/completions", CHAT),
        post("/c/v1/chat/completions?x=1&y=%20", CHAT),
        format!("POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: {chat}\n\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nCONTENT-LENGTH: {chat}\r\ncontent-TYPE: application/json\r\nX-Custom: A b\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Other: 2\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer caller\r\nx-api-key: caller\r\nHost: evil\r\nAccept-Encoding: gzip\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nX-Long: {}\r\nContent-Length: {chat}\r\n\r\n{CHAT}", "x".repeat(20_000)).into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nX-Bytes: caf\u{e9} \u{1F600}\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        b"GET /c/v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        post("/v1/chat/completions", r#"{"model":"unknown"}"#),
        post("/v1/chat/completions", r#"{"model":"m""#),
        post("/v1/chat/completions", "[]"),
        post("/v1/chat/completions", ""),
        post("/v1/%2e%2e/admin/status", CHAT),
        post("/c/v1/../../admin", CHAT),
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 70000\r\n\r\n".to_vec(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {chat}\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {chat}\r\nContent-Length: {}\r\n\r\n{CHAT}", chat + 1).into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{chat:x}\r\n{CHAT}\r\n0\r\n\r\n").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n{}\r\n{:x}\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n", &CHAT[..3], chat - 3, &CHAT[3..]).into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {chat}\r\nTransfer-Encoding: chunked\r\n\r\n{chat:x}\r\n{CHAT}\r\n0\r\n\r\n").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("POST http://elsewhere.example/v1/chat/completions HTTP/1.1\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        format!("PUT /c/v1/files HTTP/1.1\r\nContent-Length: {chat}\r\n\r\n{CHAT}").into_bytes(),
        b"DELETE /c/v1/files/x HTTP/1.1\r\n\r\n".to_vec(),
        b"HEAD /c/v1/models HTTP/1.1\r\n\r\n".to_vec(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: +{chat}\r\n\r\n{CHAT}").into_bytes(),
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":".to_vec(),
    ];
    let mut differences = Vec::new();
    for request in &corpus {
        let fast = observe(&gw, &up, FAST, request).await;
        let hyper = observe(&gw, &up, HYPER, request).await;
        if fast != hyper {
            differences.push(format!(
                "{:?}\n  fast:  {fast:?}\n  hyper: {hyper:?}",
                lossy(&request[..request.len().min(120)])
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Requests made of generated heads: methods, versions, paths, header
/// name cases, line endings, lengths, chunk encodings.
fn generated_request() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let method = prop::sample::select(vec!["POST", "GET", "PUT", "DELETE", "PATCH"]);
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]);
    let path = prop::sample::select(vec![
        "/v1/chat/completions",
        "/v1/embeddings",
        "/c/v1/chat/completions",
        "/c/v1/x?a=1&b",
        "/v1/models",
        "/healthz",
    ]);
    let name = prop::sample::select(vec![
        "Content-Type",
        "X-Custom",
        "User-Agent",
        "Accept",
        "X-Request-Id",
        "Cache-Control",
        "Connection",
    ]);
    let value = prop::sample::select(vec![
        "application/json",
        "a b",
        " padded ",
        "keep-alive",
        "close",
        "x, y",
        "",
    ]);
    let header = (name, any::<u32>(), value);
    let body = prop::sample::select(vec![
        CHAT.to_owned(),
        r#"{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
        r#"{"model":"nope"}"#.to_owned(),
        "not json".to_owned(),
        String::new(),
    ]);
    // Framing: 0 Content-Length, 1 chunked (split at the given points),
    // 2 none; line ends CRLF or LF per line.
    (
        method,
        version,
        path,
        prop::collection::vec(header, 0..5),
        body,
        0u8..3,
        prop::collection::vec(1usize..16, 0..4),
        prop::collection::vec(any::<bool>(), 12),
    )
        .prop_map(
            |(method, version, path, headers, body, framing, cuts, lf)| {
                let end = |i: usize| if lf[i % lf.len()] { "\n" } else { "\r\n" };
                let mut head = format!("{method} {path} {version}{}", end(0));
                for (i, (name, case, value)) in headers.iter().enumerate() {
                    // The name in a case drawn bit by bit.
                    let name: String = name
                        .chars()
                        .enumerate()
                        .map(|(j, c)| {
                            if case >> (j % 32) & 1 == 1 {
                                c.to_ascii_uppercase()
                            } else {
                                c.to_ascii_lowercase()
                            }
                        })
                        .collect();
                    head.push_str(&format!("{name}: {value}{}", end(i + 1)));
                }
                let mut req = head.into_bytes();
                match framing {
                    0 => req.extend_from_slice(
                        format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
                    ),
                    1 if version == "HTTP/1.1" => {
                        req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        let mut rest = body.as_str();
                        for cut in cuts {
                            if rest.len() <= cut {
                                break;
                            }
                            let (a, b) = rest.split_at(cut);
                            req.extend_from_slice(format!("{:x}\r\n{a}\r\n", a.len()).as_bytes());
                            rest = b;
                        }
                        if !rest.is_empty() {
                            req.extend_from_slice(
                                format!("{:x}\r\n{rest}\r\n", rest.len()).as_bytes(),
                            );
                        }
                        req.extend_from_slice(b"0\r\n\r\n");
                    }
                    _ => req.extend_from_slice(b"\r\n"),
                }
                req
            },
        )
}

/// The differential test over generated requests.
#[test]
fn both_paths_answer_generated_requests_alike() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (gw, up) = rt.block_on(differential_pair());
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let upstream_saw = std::cell::Cell::new(0);
    let result = runner.run(&generated_request(), |request| {
        let (fast, hyper) = rt.block_on(async {
            (
                observe(&gw, &up, FAST, &request).await,
                observe(&gw, &up, HYPER, &request).await,
            )
        });
        upstream_saw.set(upstream_saw.get() + fast.upstream.len());
        if fast == hyper {
            Ok(())
        } else {
            Err(TestCaseError::fail(format!(
                "{:?}\n  fast:  {fast:?}\n  hyper: {hyper:?}",
                lossy(&request)
            )))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Not only refusals: many generated requests reached the upstream.
    assert!(upstream_saw.get() > 10, "{}", upstream_saw.get());
    rt.block_on(gw.stop());
}

/// Item 9: the TLS backend (hyper's client, HTTP/1.1 and HTTP/2), which
/// every real provider uses, goes through the same failover, streaming,
/// abort and usage paths as the plain one; an HTTP/2 upstream whose
/// END_STREAM comes in a frame of its own still gets its usage row.
#[tokio::test]
async fn failover_streaming_aborts_and_usage_on_every_backend() {
    use serde_json::json;
    for backend in Backend::ALL {
        let a = MockUpstream::start_on(backend, "a").await;
        let b = MockUpstream::start_on(backend, "b").await;
        let gw = Gateway::start(&format!(
            "usage:\n  dir: ./usage\nopenai_clients:\n{}",
            primary_and_backup(&a, &b).concat()
        ))
        .await;
        // Failover: a answers 500, b serves.
        a.push(Reply::Json(500, json!({"error": "down"})));
        let r = gw.chat("m").await;
        assert_eq!(r.status, 200, "{backend:?}: {}", r.text());
        assert!(r.text().contains("hello from b"), "{backend:?}");

        // A JSON body in pieces, its end on its own.
        let body = json!({"id": "x", "object": "chat.completion", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}})
        .to_string();
        let (one, two) = body.split_at(body.len() / 2);
        a.push(Reply::JsonChunks(vec![one.to_owned(), two.to_owned()]));
        let r = gw.chat("m").await;
        assert_eq!((r.status, r.text()), (200, body.clone()), "{backend:?}");

        // Streaming, event by event, usage read and removed.
        a.push(Reply::Sse {
            events: vec![
                chat_chunk("he"),
                chat_chunk("llo"),
                usage_chunk(3, 4),
                DONE.to_owned(),
            ],
            gate: None,
            abort_at_end: false,
        });
        let mut resp = gw.stream("m").await;
        assert_eq!(resp.status(), 200, "{backend:?}");
        let text = read_all(resp.body_mut()).await.expect("a whole stream");
        assert!(
            text.contains("\"he\"") && text.contains("\"llo\""),
            "{text}"
        );
        assert!(
            text.ends_with(DONE) && !text.contains("prompt_tokens"),
            "{text}"
        );

        // An upstream that dies mid-stream: the caller's stream is cut.
        a.push(Reply::Sse {
            events: vec![chat_chunk("cut")],
            gate: None,
            abort_at_end: true,
        });
        let mut resp = gw.stream("m").await;
        assert_eq!(resp.status(), 200, "{backend:?}");
        let cut = read_all(resp.body_mut()).await;
        assert!(
            cut.as_ref().is_err_and(|seen| seen.contains("cut")),
            "{backend:?}: {cut:?}"
        );

        let dir = gw.stop().await;
        let db = rusqlite::Connection::open(dir.path().join(format!(
            "usage/usage-{}.sqlite",
            &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7]
        )))
        .unwrap();
        let rows: Vec<(String, i64, Option<i64>, Option<String>)> = db
            .prepare("SELECT client, status, total_tokens, error FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 4, "{backend:?}: {rows:?}");
        assert_eq!(
            (rows[0].0.as_str(), rows[0].2),
            ("b", Some(18)),
            "{backend:?}"
        );
        assert_eq!(
            (rows[1].0.as_str(), rows[1].2),
            ("a", Some(11)),
            "{backend:?}"
        );
        assert_eq!(rows[2].2, Some(7), "{backend:?}: {rows:?}");
        assert!(
            rows[3].3.is_some(),
            "{backend:?}: the cut stream's row says why"
        );
        // Each backend was what it says.
        let want = if backend == Backend::TlsH2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert!(
            a.requests().iter().all(|r| r.version == want),
            "{backend:?}"
        );
        let scheme = if backend == Backend::Plain {
            "http://"
        } else {
            "https://"
        };
        assert!(a.url().starts_with(scheme));
    }
}
