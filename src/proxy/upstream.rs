//! Upstream connections and the upstream request builder.
//!
//! Each worker thread keeps its own pool of upstream connections, keyed by
//! scheme and authority: HTTP/1.1 connections are reused one request at a
//! time, an HTTP/2 connection (when TLS negotiates it) is shared. A
//! request never hops threads and the pool needs no lock. An HTTP/1.1
//! connection goes back to the pool when its response body has been read
//! to the end; a body dropped early closes it. Pools outlive reloads, so
//! pooled connections survive them.
//! Redirects are never followed: a key is sent only to its `base_url`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use crate::routing::{ClientRoute, KeyRoute};

type Connector = HttpsConnector<HttpConnector>;

/// An idle connection unused this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per upstream and thread.
const MAX_IDLE: usize = 1024;
/// How often a busy thread looks for idle connections past IDLE_TIMEOUT
/// under upstreams it no longer uses.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect error: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the upstream URL has no host")]
    NoHost,
}

/// The upstream connection pools (one per worker thread, see the module
/// documentation); a handle with no state of its own.
#[derive(Default)]
pub struct UpstreamClients;

impl UpstreamClients {
    /// Sends `req` (absolute URI) on a pooled or new connection. An idle
    /// connection found closed when used is replaced, and the request sent
    /// again, only when it had not been sent at all.
    pub async fn send(
        &self,
        connect_timeout: Duration,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let uri = req.uri().clone();
        let key = PoolKey {
            https: uri.scheme() == Some(&Scheme::HTTPS),
            authority: uri.authority().cloned().ok_or(SendError::NoHost)?,
        };
        loop {
            let (sender, reused) = match POOL.with(|p| p.borrow_mut().take(&key)) {
                Some(s) => (s, true),
                None => (
                    connect(connector(connect_timeout), &uri, &key).await?,
                    false,
                ),
            };
            let sent = match sender {
                Sender::H1(mut s) => {
                    if let Err(e) = s.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(e.into());
                    }
                    if !req.headers().contains_key(header::HOST) {
                        if let Some(host) = host_header(&uri, key.https) {
                            req.headers_mut().insert(header::HOST, host);
                        }
                    }
                    origin_form(req.uri_mut());
                    match s.try_send_request(req).await {
                        Ok(resp) => {
                            let release = Release {
                                key: key.clone(),
                                sender: s,
                            };
                            return Ok(resp.map(|b| UpstreamBody::new(b, Some(release))));
                        }
                        Err(e) => e,
                    }
                }
                Sender::H2(mut s) => {
                    if let Err(e) = s.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(e.into());
                    }
                    match s.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|b| UpstreamBody::new(b, None))),
                        Err(e) => e,
                    }
                }
            };
            let mut failed = sent;
            match failed.take_message() {
                Some(mut unsent) if reused => {
                    *unsent.uri_mut() = uri.clone();
                    req = unsent;
                }
                _ => return Err(failed.into_error().into()),
            }
        }
    }
}

/// The response body of an upstream request; hands its HTTP/1.1 connection
/// back to this thread's pool once read to the end.
pub struct UpstreamBody {
    inner: Incoming,
    release: Option<Release>,
}

impl UpstreamBody {
    fn new(inner: Incoming, release: Option<Release>) -> UpstreamBody {
        let mut body = UpstreamBody { inner, release };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(r) = self.release.take() {
            POOL.with(|p| p.borrow_mut().put(r.key, r.sender));
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A failed connection is never reused.
            Poll::Ready(Some(Err(_))) => drop(this.release.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    https: bool,
    authority: Authority,
}

struct Release {
    key: PoolKey,
    sender: http1::SendRequest<Full<Bytes>>,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

#[derive(Default)]
struct Upstream {
    /// Oldest at the front; the newest (warmest) is used first.
    h1: VecDeque<Idle>,
    h2: Option<http2::SendRequest<Full<Bytes>>>,
}

impl Upstream {
    fn drop_stale(&mut self, now: Instant) {
        while self
            .h1
            .front()
            .is_some_and(|i| i.sender.is_closed() || now.duration_since(i.since) > IDLE_TIMEOUT)
        {
            self.h1.pop_front();
        }
        if self.h2.as_ref().is_some_and(|s| s.is_closed()) {
            self.h2 = None;
        }
    }
}

struct Pool {
    upstreams: HashMap<PoolKey, Upstream>,
    connectors: HashMap<Duration, Connector>,
    last_sweep: Instant,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        upstreams: HashMap::new(),
        connectors: HashMap::new(),
        last_sweep: Instant::now(),
    });
}

impl Pool {
    fn take(&mut self, key: &PoolKey) -> Option<Sender> {
        let now = Instant::now();
        self.sweep(now);
        let up = self.upstreams.get_mut(key)?;
        up.drop_stale(now);
        if let Some(h2) = &up.h2 {
            return Some(Sender::H2(h2.clone()));
        }
        while let Some(idle) = up.h1.pop_back() {
            if !idle.sender.is_closed() {
                return Some(Sender::H1(idle.sender));
            }
        }
        None
    }

    fn put(&mut self, key: PoolKey, sender: http1::SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let up = self.upstreams.entry(key).or_default();
        up.h1.push_back(Idle { sender, since: now });
        if up.h1.len() > MAX_IDLE {
            up.h1.pop_front();
        }
    }

    /// Closes idle connections past their time under every upstream.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        for up in self.upstreams.values_mut() {
            up.drop_stale(now);
        }
        self.upstreams
            .retain(|_, up| !up.h1.is_empty() || up.h2.is_some());
    }
}

/// This thread's connector for this connect timeout (a cheap handle clone).
fn connector(connect_timeout: Duration) -> Connector {
    POOL.with(|p| {
        p.borrow_mut()
            .connectors
            .entry(connect_timeout)
            .or_insert_with(|| build_connector(connect_timeout))
            .clone()
    })
}

fn build_connector(connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .expect("the ring provider supports the default TLS versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// Opens a connection (TLS where the URL says https; HTTP/2 where TLS
/// negotiates it) and starts driving it on this thread's runtime.
async fn connect(mut connector: Connector, uri: &Uri, key: &PoolKey) -> Result<Sender, SendError> {
    let io = connector
        .call(uri.clone())
        .await
        .map_err(SendError::Connect)?;
    if io.connected().is_negotiated_h2() {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        POOL.with(|p| {
            p.borrow_mut().upstreams.entry(key.clone()).or_default().h2 = Some(sender.clone())
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Sender::H1(sender))
    }
}

/// `Host` for HTTP/1.1: the host, and the port when not the scheme's default.
fn host_header(uri: &Uri, https: bool) -> Option<HeaderValue> {
    let host = uri.host()?;
    match uri.port_u16() {
        Some(port) if port != if https { 443 } else { 80 } => {
            HeaderValue::from_str(&format!("{host}:{port}")).ok()
        }
        _ => HeaderValue::from_str(host).ok(),
    }
}

/// HTTP/1.1 requests carry only the path and query in the request line.
fn origin_form(uri: &mut Uri) {
    let path = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
    *uri = path;
}

/// Caller headers never sent upstream: hop-by-hop headers, the caller's own
/// credentials, and those gptbalance sets itself.
const NOT_FORWARDED: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
    "http2-settings",
];

/// The caller's headers minus those never forwarded (and any the caller's
/// `Connection` header names), with room for `extra` more.
fn forwardable_headers(caller: &HeaderMap, extra: usize) -> HeaderMap {
    let named_by_connection: Vec<String> = caller
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(caller.len() + extra);
    for (name, value) in caller {
        let n = name.as_str();
        if NOT_FORWARDED.contains(&n) || named_by_connection.iter().any(|c| c == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Response headers not relayed to the caller (hop-by-hop, and the length
/// when gptbalance may change the body).
pub fn relayable_response_headers(upstream: &HeaderMap, keep_length: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 1);
    for (name, value) in upstream {
        match name.as_str() {
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te"
            | "trailer" | "upgrade" => {}
            "content-length" if !keep_length => {}
            _ => {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out
}

/// Builds one attempt's request to `client` with `key`; `caller_headers`
/// are filtered as they are copied (one header map per attempt).
pub fn build_request(
    client: &ClientRoute,
    key: &KeyRoute,
    method: &Method,
    endpoint: &str,
    query: Option<&str>,
    caller_headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut url = String::with_capacity(client.cfg.base_url.len() + endpoint.len() + 2);
    url.push_str(&client.cfg.base_url);
    url.push('/');
    url.push_str(endpoint);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    let uri: Uri = url.parse()?;
    let mut req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Full::new(body))?;
    let h = req.headers_mut();
    *h = forwardable_headers(caller_headers, 3 + client.cfg.headers.len());
    h.insert(header::AUTHORIZATION, key.authorization.clone());
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if !h.contains_key(header::CONTENT_TYPE) && method == Method::POST {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    for (name, value) in &client.cfg.headers {
        h.insert::<HeaderName>(name.clone(), value.clone());
    }
    Ok(req)
}
