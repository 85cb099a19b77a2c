//! Shared test harness: a scripted mock upstream and the real gateway, both
//! in-process on 127.0.0.1 port 0, plus a small HTTP client.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gptbalance::metrics::Metrics;
use gptbalance::proxy::server;
use gptbalance::routing::RoutingTable;
use gptbalance::state::AppState;
use gptbalance::usage::{UsageSink, UsageWriter};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// One request as the mock upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn auth(&self) -> String {
        self.header("authorization")
    }

    /// A header's value, empty when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// What the mock does with one request.
#[derive(Clone)]
pub enum Reply {
    /// A chat completion echoing the model, with usage.
    Ok,
    Json(u16, Value),
    /// Status, extra headers, body.
    Raw(u16, Vec<(String, String)>, String),
    /// SSE events (already framed), each sent after waiting for a permit of
    /// the gate when one is given (the first is sent at once).
    Sse {
        events: Vec<String>,
        gate: Option<Arc<Semaphore>>,
        abort_at_end: bool,
    },
    /// 200 with SSE headers, then the connection dies before any body byte.
    DieBeforeBody,
    /// Never answers.
    Hang,
    /// Waits, then answers Ok.
    Delay(Duration),
    /// Closes the connection without answering.
    Reset,
    /// 200 `application/json` whose body comes as these pieces and then
    /// ends on its own (over HTTP/2, END_STREAM in a frame of its own).
    JsonChunks(Vec<String>),
}

#[derive(Default)]
pub struct MockState {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    log: Mutex<Vec<Recorded>>,
    /// Streams whose reader went away before the mock finished sending.
    pub cancelled_streams: AtomicUsize,
    /// Requests whose response future was dropped before answering.
    pub dropped_requests: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    pub name: String,
    /// `http`, or `https` for a TLS mock.
    pub scheme: &'static str,
}

/// Which kind of upstream a test runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    /// Plain HTTP/1.1: gptbalance's own client.
    Plain,
    /// TLS, HTTP/1.1 offered: hyper's client.
    Tls,
    /// TLS, HTTP/2 offered: hyper's client, one shared connection.
    TlsH2,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Plain, Backend::Tls, Backend::TlsH2];
}

/// The certificate (self-signed, for 127.0.0.1, its own trust anchor) of
/// every TLS mock upstream in this test process, and its key; made once,
/// with openssl. A gateway started after it exists trusts it.
static TEST_CERT: std::sync::OnceLock<(
    tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
)> = std::sync::OnceLock::new();

pub fn test_certificate() -> &'static (
    tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    TEST_CERT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "127.0.0.1", 1);
        (
            CertificateDer::from_pem_file(&cert).unwrap(),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
    })
}

/// A self-signed certificate for 127.0.0.1 named `CN=name` with `serial`,
/// written as `name.crt` and `name.key` in `dir` by openssl.
pub fn make_cert(dir: &Path, name: &str, serial: u32) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-set_serial", &serial.to_string()])
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test certificates");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

struct DropFlag(Arc<MockState>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.dropped_requests.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);
impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

type MockBody = http_body_util::Either<Full<Bytes>, ChannelBody>;

pub fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

pub fn chat_chunk(content: &str) -> String {
    sse(
        &json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]}),
    )
}

pub fn usage_chunk(p: u64, c: u64) -> String {
    sse(
        &json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}),
    )
}

pub const DONE: &str = "data: [DONE]\n\n";

/// A non-stream Anthropic Messages reply for `model`, with usage.
pub fn anthropic_message(model: &str, text: &str) -> Value {
    json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2, "output_tokens": 6}
    })
}

/// One Anthropic SSE event, `event:` line included.
pub fn anthropic_event(data: &Value) -> String {
    format!(
        "event: {}\ndata: {data}\n\n",
        data["type"].as_str().unwrap_or("")
    )
}

/// A whole Anthropic message stream saying `parts`: input 10 (+3 read
/// from the cache), output 5.
pub fn anthropic_stream(model: &str, parts: &[&str]) -> Vec<String> {
    let mut events = vec![
        anthropic_event(
            &json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "cache_read_input_tokens": 3, "output_tokens": 1}}}),
        ),
        anthropic_event(
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        anthropic_event(&json!({"type": "ping"})),
    ];
    for p in parts {
        events.push(anthropic_event(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})));
    }
    events.push(anthropic_event(
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(anthropic_event(&json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 5}})));
    events.push(anthropic_event(&json!({"type": "message_stop"})));
    events
}

impl MockUpstream {
    pub async fn start(name: &str) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        let st = state.clone();
        let mock_name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let name = mock_name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), name.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            state,
            name: name.to_owned(),
            scheme: "http",
        }
    }

    /// A mock of `backend`'s kind.
    pub async fn start_on(backend: Backend, name: &str) -> MockUpstream {
        match backend {
            Backend::Plain => MockUpstream::start(name).await,
            Backend::Tls => MockUpstream::start_tls(name, false).await,
            Backend::TlsH2 => MockUpstream::start_tls(name, true).await,
        }
    }

    /// The same mock behind TLS, with the test certificate; offering
    /// HTTP/2 in ALPN when `h2`, else HTTP/1.1 only.
    pub async fn start_tls(name: &str, h2: bool) -> MockUpstream {
        use tokio_rustls::rustls;
        let (cert, key) = test_certificate();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .unwrap();
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        let st = state.clone();
        let mock_name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let name = mock_name.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let negotiated_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(move |req| answer(st.clone(), name.clone(), req));
                    let io = TokioIo::new(tls);
                    if negotiated_h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        MockUpstream {
            addr,
            state,
            name: name.to_owned(),
            scheme: "https",
        }
    }

    /// `http://127.0.0.1:PORT/v1` (`https` for a TLS mock).
    pub fn url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    /// The next request gets this reply (in order); afterwards the default.
    pub fn push(&self, reply: Reply) {
        self.state.script.lock().unwrap().push_back(reply);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    /// Streams whose receiver was gone when the mock sent an event.
    pub fn cancelled_streams(&self) -> usize {
        self.state.cancelled_streams.load(Ordering::SeqCst)
    }

    /// Requests dropped before the mock answered them.
    pub fn dropped_requests(&self) -> usize {
        self.state.dropped_requests.load(Ordering::SeqCst)
    }

    /// Asserts that exactly `n` requests came, each with `body`.
    pub fn assert_bodies(&self, n: usize, body: &[u8]) {
        let requests = self.requests();
        assert_eq!(requests.len(), n);
        for r in requests {
            assert_eq!(r.body.as_ref(), body);
        }
    }
}

async fn answer(
    st: Arc<MockState>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let mut flag = DropFlag(st.clone(), false);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body,
        version: parts.version,
    };
    st.log.lock().unwrap().push(rec.clone());
    let reply = st
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| st.default.lock().unwrap().clone())
        .unwrap_or(Reply::Ok);
    let full = |status: u16, headers: Vec<(String, String)>, body: String| {
        let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        for (k, v) in headers {
            r.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        r
    };
    let ok = |rec: &Recorded| {
        let model = rec.json()["model"].as_str().unwrap_or("").to_owned();
        json!({
            "id": "cmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("hello from {name}")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        })
    };
    let resp = match reply {
        Reply::Ok => full(200, vec![], ok(&rec).to_string()),
        Reply::Delay(d) => {
            tokio::time::sleep(d).await;
            full(200, vec![], ok(&rec).to_string())
        }
        Reply::Json(status, v) => full(status, vec![], v.to_string()),
        Reply::Raw(status, headers, body) => full(status, headers, body),
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Reset => {
            flag.1 = true;
            return Err(std::io::Error::other("mock resets the connection"));
        }
        Reply::DieBeforeBody => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(Err(std::io::Error::other("mock dies"))).await;
            });
            let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        Reply::JsonChunks(chunks) => {
            let (tx, rx) = mpsc::channel(chunks.len().max(1));
            for c in chunks {
                let _ = tx.try_send(Ok(Bytes::from(c)));
            }
            let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
        Reply::Sse {
            events,
            gate,
            abort_at_end,
        } => {
            let (tx, rx) = mpsc::channel(1);
            let st2 = st.clone();
            tokio::spawn(async move {
                for (i, ev) in events.into_iter().enumerate() {
                    if i > 0 {
                        if let Some(g) = &gate {
                            g.acquire().await.unwrap().forget();
                        }
                    }
                    if tx.send(Ok(Bytes::from(ev))).await.is_err() {
                        st2.cancelled_streams.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                if abort_at_end {
                    let _ = tx
                        .send(Err(std::io::Error::other("mock aborts mid-stream")))
                        .await;
                }
            });
            let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    };
    flag.1 = true;
    Ok(resp)
}

/// The real gateway, served in-process from a config file in a temp dir.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    writer: Option<UsageWriter>,
    _watcher: gptbalance::ops::reload::ConfigWatch,
}

impl Gateway {
    pub async fn start(yaml: &str) -> Gateway {
        Self::start_with(yaml, None).await
    }

    pub async fn start_with(yaml: &str, clock: Option<gptbalance::state::Clock>) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let loaded = gptbalance::config::load(&path).unwrap_or_else(|e| match e {
            gptbalance::config::LoadError::Invalid(d) => panic!("invalid test config: {d:#?}"),
            e => panic!("{e}"),
        });
        let metrics = Arc::new(Metrics::new());
        let (writer, sink) = if loaded.config.usage.enabled {
            let (w, s) = UsageWriter::start(&loaded.config.usage.dir, metrics.clone()).unwrap();
            (Some(w), s)
        } else {
            (None, UsageSink::disabled(metrics.clone()))
        };
        let usage_dir = loaded.config.usage.dir.clone();
        let table = RoutingTable::build(loaded.config, None);
        gptbalance::cli::serve::restore_spend(&table, &usage_dir);
        let shared = table.config.shared_state.clone();
        let mut state = AppState::new(table, sink, metrics, Some(path));
        if let Some((cert, _)) = TEST_CERT.get() {
            state.upstream = gptbalance::upstream::UpstreamClients::trusting(vec![cert.clone()]);
        }
        if let Some(c) = clock {
            state = state.with_clock(c);
        }
        state.shared = shared.map(|c| Arc::new(gptbalance::limits::shared::SharedState::new(c)));
        let state = Arc::new(state);
        gptbalance::cli::serve::share_state(&state);
        // As `serve` does: clients with discover_models fetch their lists.
        gptbalance::ops::discovery::refresh(&state);
        gptbalance::ops::probe::spawn(&state);
        let watcher =
            gptbalance::ops::reload::watch(state.clone(), &state.config_path.clone().unwrap())
                .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            server::run(listener, st, async {
                let _ = rx.await;
            })
            .await;
        });
        Gateway {
            addr,
            state,
            dir,
            shutdown: Some(tx),
            task: Some(task),
            writer,
            _watcher: watcher,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// A streaming chat request for `model`, returned once its headers arrive.
    pub async fn stream(&self, model: &str) -> Response<Incoming> {
        open_stream(
            &self.url("/v1/chat/completions"),
            json!({"model": model, "stream": true, "messages": []}),
        )
        .await
    }

    /// `POST /v1/chat/completions` for `model`, with a one-line message.
    pub async fn chat(&self, model: &str) -> Reply2 {
        post(&self.url("/v1/chat/completions"), chat(model)).await
    }

    pub fn generation(&self) -> u64 {
        self.state.table.load().generation
    }

    /// Waits until the routing table reaches `generation` (2 s at most).
    pub async fn wait_generation(&self, generation: u64) -> bool {
        eventually(Duration::from_secs(2), || self.generation() >= generation).await
    }

    /// Stops serving and flushes the usage writer.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Some(w) = self.writer.take() {
            tokio::task::spawn_blocking(move || w.shutdown())
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply2 {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply2 {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply2 {
    let resp = tokio::time::timeout(Duration::from_secs(20), client().request(req))
        .await
        .expect("gateway answered within 20s")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply2 {
        status,
        headers,
        body,
    }
}

pub fn post_req(
    url: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

pub async fn post(url: &str, body: Value) -> Reply2 {
    send(post_req(url, body.to_string(), &[])).await
}

pub async fn post_with(url: &str, body: Value, headers: &[(&str, &str)]) -> Reply2 {
    send(post_req(url, body.to_string(), headers)).await
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply2 {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Starts a streaming request and returns the live response.
pub async fn open_stream(url: &str, body: Value) -> Response<Incoming> {
    tokio::time::timeout(
        Duration::from_secs(20),
        client().request(post_req(url, body.to_string(), &[])),
    )
    .await
    .expect("headers within 20s")
    .expect("request failed")
}

/// The next data frame of a response, within 5 s; `None` at the end.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, String>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a chunk within 5s")?;
        match frame {
            Err(e) => return Some(Err(e.to_string())),
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if !d.is_empty() {
                        return Some(Ok(d));
                    }
                }
            }
        }
    }
}

/// Reads a whole body; `Err` carries what arrived before the error.
pub async fn read_all(body: &mut Incoming) -> Result<String, String> {
    let mut out = String::new();
    while let Some(chunk) = next_chunk(body).await {
        match chunk {
            Ok(b) => out.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => return Err(out),
        }
    }
    Ok(out)
}

/// Polls `check` until it is true or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

pub fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// The usual single test client: `c`, key `k`, serving exactly model `m`;
/// `extra` holds more client keys, one per line.
pub fn one_client(up: &MockUpstream, extra: &str) -> String {
    client_yaml(
        "c",
        &up.url(),
        &["k"],
        &format!("{extra}model_match: {{ type: exact, value: [m] }}"),
    )
}

/// Client `a` (priority 1) and its backup `b` (priority 2), both serving `m`.
pub fn primary_and_backup(a: &MockUpstream, b: &MockUpstream) -> [String; 2] {
    [
        client_yaml(
            "a",
            &a.url(),
            &["k"],
            "priority: 1\nmodel_match: { type: exact, value: [m] }",
        ),
        client_yaml(
            "b",
            &b.url(),
            &["k"],
            "priority: 2\nmodel_match: { type: exact, value: [m] }",
        ),
    ]
}

/// A client entry for test configs.
pub fn client_yaml(name: &str, url: &str, keys: &[&str], extra: &str) -> String {
    let keys = keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!("  - name: {name}\n    base_url: \"{url}\"\n    api_keys: [{keys}]\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str("    ");
        s.push_str(line.trim_start());
        s.push('\n');
    }
    s
}

/// `gptbalance serve --config CONFIG --listen 127.0.0.1:0` in `dir`, with
/// its log lines (stderr, `info`) on a channel: the child, the address it
/// reported, the whole line that reported it, and the lines after it.
pub fn spawn_serve(
    config: &str,
    dir: &std::path::Path,
) -> (
    std::process::Child,
    String,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gptbalance"))
        .args(["serve", "--config", config, "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_owned();
                return (child, addr, line, rx);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not report its address");
}

/// Sends raw bytes and returns everything the gateway answers until it closes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
