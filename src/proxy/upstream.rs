//! Upstream connections and the upstream request builder.
//!
//! Each worker thread keeps its own pool of upstream connections, keyed by
//! scheme and authority: HTTP/1.1 connections are reused one request at a
//! time, an HTTP/2 connection (when TLS negotiates it) is shared. Plain-HTTP
//! upstreams are spoken to by [`super::plain`] on the request's own task;
//! TLS ones through hyper. A request never hops threads and the pool needs
//! no lock. An HTTP/1.1
//! connection goes back to the pool when its response body has been read
//! to the end; a body dropped early closes it. Pools outlive reloads, so
//! pooled connections survive them.
//! Redirects are never followed: a key is sent only to its `base_url`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use tower_service::Service;

use super::plain::{self, PlainBody, RelayedHeaders, WireError, Written, FOREIGN_CODING};
use super::request::Outgoing;

use crate::routing::table::Fnv;

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
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the upstream URL has no host")]
    NoHost,
}

/// Why an upstream response body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The upstream connection pools (one per worker thread, see the module
/// documentation); a handle whose only state is the roots its TLS
/// connections trust beyond the Mozilla set, none but in tests.
#[derive(Default)]
pub struct UpstreamClients {
    extra_roots: Option<Arc<[CertificateDer<'static>]>>,
}

impl UpstreamClients {
    /// Sends `req` (absolute URI) on a pooled or new connection. An idle
    /// connection found closed when used is replaced, and the request sent
    /// again, only when it had not been sent at all.
    pub async fn send(
        &self,
        connect_timeout: Duration,
        req: Outgoing<'_>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        self.send_at(connect_timeout, req, Instant::now()).await
    }

    /// [`UpstreamClients::send`] with the caller's reading of the clock
    /// (`now`, for the pool's idle times): the attempt has just read it.
    pub async fn send_at(
        &self,
        connect_timeout: Duration,
        req: Outgoing<'_>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let key = PoolKey {
            https: req.uri.scheme() == Some(&Scheme::HTTPS),
            authority: req.uri.authority().cloned().ok_or(SendError::NoHost)?,
        };
        if !key.https {
            return send_plain(connect_timeout, req, key, now).await;
        }
        let req = req.into_request();
        let uri = req.uri().clone();
        let connector = connector(connect_timeout, self.extra_roots.as_ref());
        // Boxed: the TLS path's future is large, and inline it would make
        // every plain-HTTP request's future (and each one awaiting it) as
        // large, to be moved whole at every level.
        Box::pin(send_tls(connector, req, uri, key, now)).await
    }

    /// Clients whose TLS connections trust only `roots` (tests: an
    /// upstream with a certificate made at test time). Never built from
    /// configuration.
    pub fn trusting(roots: Vec<CertificateDer<'static>>) -> UpstreamClients {
        UpstreamClients {
            extra_roots: Some(roots.into()),
        }
    }
}

/// Sends over TLS (HTTP/1.1 or HTTP/2, by ALPN) with hyper's client
/// connections; the pooling and resending rules are `send`'s.
async fn send_tls(
    connector: Connector,
    req: Request<Bytes>,
    uri: Uri,
    key: PoolKey,
    now: Instant,
) -> Result<Response<UpstreamBody>, SendError> {
    let body = req.body().clone();
    let mut req = req.map(Full::new);
    loop {
        let (pooled, host) = POOL.with(|p| p.borrow_mut().take(&key, now));
        let (sender, reused) = match pooled {
            Some(s) => (s, true),
            // Boxed: the handshake futures are large and rarely
            // needed, and every in-flight request would carry their
            // size inline.
            None => (
                Box::pin(connect(connector.clone(), &uri, &key)).await?,
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
                if let Some(host) = host {
                    req.headers_mut().entry(header::HOST).or_insert(host);
                }
                origin_form(req.uri_mut());
                match s.try_send_request(req).await {
                    Ok(resp) if foreign_transfer_coding(resp.headers()) => {
                        return Err(WireError::Invalid(FOREIGN_CODING).into());
                    }
                    Ok(resp) => {
                        let release = Release {
                            key: key.clone(),
                            sender: s,
                        };
                        return Ok(resp.map(|b| UpstreamBody::hyper(b, Some(release))));
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
                    Ok(resp) => return Ok(resp.map(|b| UpstreamBody::hyper(b, None))),
                    Err(e) => e,
                }
            }
        };
        let mut failed = sent;
        match failed.take_message() {
            Some(unsent) if reused => {
                let (mut parts, _) = unsent.into_parts();
                parts.uri = uri.clone();
                req = Request::from_parts(parts, Full::new(body.clone()));
            }
            _ => return Err(failed.into_error().into()),
        }
    }
}

/// How long an answer is looked for on a connection whose request could
/// not be written in full; only bytes already received can be there.
const EARLY_ANSWER: Duration = Duration::from_secs(1);

/// Sends on a pooled plain-HTTP connection, or a new one. When the request
/// cannot be written in full, an answer the upstream sent early (a 413 or
/// 401 before reading the whole body) is the response; with none, a
/// pooled connection had been closed by the upstream and the request goes
/// again on a new one. Once written, a request is never sent again here
/// (the upstream may have acted on it).
async fn send_plain(
    connect_timeout: Duration,
    req: Outgoing<'_>,
    key: PoolKey,
    now: Instant,
) -> Result<Response<UpstreamBody>, SendError> {
    loop {
        let (pooled, host) = POOL.with(|p| p.borrow_mut().take_plain(&key, now));
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            // Boxed: only new connections need it, and inline it would
            // be the largest part of every request's future.
            None => Box::pin(plain::Conn::connect(&key.authority, connect_timeout)).await?,
        };
        match conn.write_request(&req, host.as_ref()).await {
            Ok(Written::Whole) => {}
            Ok(Written::Cut) => {
                // Answered before the whole request went out: that answer
                // is the response, and the connection is not reused.
                let (head, body) = conn.read_head(&req.method).await?;
                let body = UpstreamBody {
                    inner: Inner::Plain(body),
                    key: None,
                };
                return Ok(head.map(|()| body));
            }
            Err(e) => {
                let early = tokio::time::timeout(EARLY_ANSWER, conn.read_head(&req.method)).await;
                if let Ok(Ok((head, body))) = early {
                    let body = UpstreamBody {
                        inner: Inner::Plain(body),
                        key: None,
                    };
                    return Ok(head.map(|()| body));
                }
                if reused {
                    continue;
                }
                return Err(WireError::Io(e).into());
            }
        }
        let (head, body) = conn.read_head(&req.method).await?;
        let mut body = UpstreamBody {
            inner: Inner::Plain(body),
            key: Some(key),
        };
        body.release_if_done();
        return Ok(head.map(|()| body));
    }
}

/// The response body of an upstream request; hands its HTTP/1.1 connection
/// back to this thread's pool once read to the end.
pub struct UpstreamBody {
    inner: Inner,
    /// Where an HTTP/1.1 connection goes back to; `None` once it has.
    key: Option<PoolKey>,
}

enum Inner {
    Hyper {
        body: Incoming,
        sender: Option<http1::SendRequest<Full<Bytes>>>,
    },
    Plain(PlainBody),
}

impl UpstreamBody {
    fn hyper(body: Incoming, release: Option<Release>) -> UpstreamBody {
        let (key, sender) = match release {
            Some(r) => (Some(r.key), Some(r.sender)),
            None => (None, None),
        };
        let mut body = UpstreamBody {
            inner: Inner::Hyper { body, sender },
            key,
        };
        body.release_if_done();
        body
    }

    /// Returns the connection to the pool once the body has ended.
    fn release_if_done(&mut self) {
        if self.is_end_stream() {
            self.release();
        }
    }

    /// Returns the connection to the pool: the body has been read to its end.
    fn release(&mut self) {
        let Some(key) = self.key.take() else { return };
        match &mut self.inner {
            Inner::Hyper { sender, .. } => {
                if let Some(s) = sender.take() {
                    POOL.with(|p| p.borrow_mut().put(key, s));
                }
            }
            Inner::Plain(body) => {
                if let Some(conn) = body.take_reusable() {
                    POOL.with(|p| p.borrow_mut().put_plain(key, conn));
                }
            }
        }
    }

    /// A failed connection is never reused.
    fn forget_connection(&mut self) {
        self.key = None;
        if let Inner::Hyper { sender, .. } = &mut self.inner {
            *sender = None;
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Hyper { body, .. } => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Inner::Plain(body) => body
                .poll_data(cx)
                .map_ok(Frame::data)
                .map_err(BodyError::from),
        };
        match &polled {
            Poll::Ready(Some(Err(_))) => this.forget_connection(),
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(None) => this.release(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Plain(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Plain(body) => match body.exact_len() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

#[derive(Clone)]
struct PoolKey {
    https: bool,
    authority: Authority,
}

// By the authority's text as written in `base_url`, hashed in one call
// (`Authority`'s own Hash lowercases and hashes byte by byte). Two
// spellings of one host only get two pools.
impl std::hash::Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.authority.as_str().as_bytes());
        state.write_u8(u8::from(self.https));
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &PoolKey) -> bool {
        self.https == other.https && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for PoolKey {}

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

struct IdlePlain {
    conn: plain::Conn,
    since: Instant,
}

#[derive(Default)]
struct Upstream {
    /// Oldest at the front; the newest (warmest) is used first.
    h1: VecDeque<Idle>,
    /// Plain-HTTP connections, oldest at the front.
    plain: VecDeque<IdlePlain>,
    h2: Option<http2::SendRequest<Full<Bytes>>>,
    /// The `Host` header for HTTP/1.1 requests, made once.
    host: Option<HeaderValue>,
}

impl Upstream {
    fn take(&mut self, now: Instant) -> Option<Sender> {
        self.drop_stale(now);
        if let Some(h2) = &self.h2 {
            return Some(Sender::H2(h2.clone()));
        }
        while let Some(idle) = self.h1.pop_back() {
            if !idle.sender.is_closed() {
                return Some(Sender::H1(idle.sender));
            }
        }
        None
    }

    fn drop_stale(&mut self, now: Instant) {
        while self
            .h1
            .front()
            .is_some_and(|i| i.sender.is_closed() || now.duration_since(i.since) > IDLE_TIMEOUT)
        {
            self.h1.pop_front();
        }
        while self
            .plain
            .front()
            .is_some_and(|i| now.duration_since(i.since) > IDLE_TIMEOUT)
        {
            self.plain.pop_front();
        }
        if self.h2.as_ref().is_some_and(|s| s.is_closed()) {
            self.h2 = None;
        }
    }
}

struct Pool {
    upstreams: HashMap<PoolKey, Upstream, BuildHasherDefault<Fnv>>,
    /// By connect timeout and extra roots (their address; 0 for none).
    connectors: HashMap<(Duration, usize), Connector>,
    last_sweep: Instant,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        upstreams: HashMap::default(),
        connectors: HashMap::new(),
        last_sweep: Instant::now(),
    });
}

impl Pool {
    /// An idle connection to `key`'s upstream, if any, and its `Host`.
    fn take(&mut self, key: &PoolKey, now: Instant) -> (Option<Sender>, Option<HeaderValue>) {
        self.sweep(now);
        let up = match self.upstreams.get_mut(key) {
            Some(up) => up,
            None => self.upstreams.entry(key.clone()).or_default(),
        };
        if up.host.is_none() {
            up.host = host_header(&key.authority, key.https);
        }
        (up.take(now), up.host.clone())
    }

    /// An idle plain-HTTP connection that still looks open, and `Host`.
    fn take_plain(
        &mut self,
        key: &PoolKey,
        now: Instant,
    ) -> (Option<plain::Conn>, Option<HeaderValue>) {
        self.sweep(now);
        let up = match self.upstreams.get_mut(key) {
            Some(up) => up,
            None => self.upstreams.entry(key.clone()).or_default(),
        };
        if up.host.is_none() {
            up.host = host_header(&key.authority, key.https);
        }
        up.drop_stale(now);
        while let Some(mut idle) = up.plain.pop_back() {
            if idle.conn.is_reusable() {
                return (Some(idle.conn), up.host.clone());
            }
        }
        (None, up.host.clone())
    }

    fn put_plain(&mut self, key: PoolKey, conn: plain::Conn) {
        let now = Instant::now();
        let up = self.upstreams.entry(key).or_default();
        up.plain.push_back(IdlePlain { conn, since: now });
        if up.plain.len() > MAX_IDLE {
            up.plain.pop_front();
        }
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
            .retain(|_, up| !up.h1.is_empty() || !up.plain.is_empty() || up.h2.is_some());
    }
}

/// Closes this thread's idle connections that are past their time or that
/// the upstream has closed. Run by each worker's heartbeat, so a thread
/// that has gone quiet does not keep closed sockets open (hyper's
/// connection tasks close theirs on their own; plain connections have no
/// task).
pub fn sweep_idle_connections() {
    POOL.with(|p| {
        let Ok(mut pool) = p.try_borrow_mut() else {
            return;
        };
        let now = Instant::now();
        for up in pool.upstreams.values_mut() {
            up.drop_stale(now);
            up.plain.retain_mut(|idle| idle.conn.is_reusable());
        }
        pool.upstreams
            .retain(|_, up| !up.h1.is_empty() || !up.plain.is_empty() || up.h2.is_some());
        pool.last_sweep = now;
    });
}

/// Makes this thread use `connector` for `connect_timeout` (tests: a
/// connector that trusts a test certificate).
#[cfg(test)]
fn install_connector(connect_timeout: Duration, connector: Connector) {
    POOL.with(|p| {
        p.borrow_mut()
            .connectors
            .insert((connect_timeout, 0), connector)
    });
}

/// This thread's connector for this connect timeout (a cheap handle clone).
fn connector(
    connect_timeout: Duration,
    extra_roots: Option<&Arc<[CertificateDer<'static>]>>,
) -> Connector {
    let roots_id = extra_roots.map_or(0, |r| Arc::as_ptr(r).cast::<u8>() as usize);
    POOL.with(|p| {
        p.borrow_mut()
            .connectors
            .entry((connect_timeout, roots_id))
            .or_insert_with(|| build_connector(connect_timeout, extra_roots))
            .clone()
    })
}

fn build_connector(
    connect_timeout: Duration,
    extra_roots: Option<&Arc<[CertificateDer<'static>]>>,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match extra_roots {
        None => builder
            .with_provider_and_webpki_roots(provider)
            .expect("the ring provider supports the default TLS versions"),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for root in roots.iter() {
                let _ = store.add(root.clone());
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .with_root_certificates(store)
                .with_no_client_auth();
            builder.with_tls_config(config)
        }
    };
    builder
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
            .max_header_list_size(64 * 1024)
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
        // The response head limit of the plain client: 64 KiB, 100 lines.
        let (sender, conn) = http1::Builder::new()
            .max_header_size(64 * 1024)
            .max_headers(100)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Sender::H1(sender))
    }
}

/// `Host` for HTTP/1.1: the host, and the port when not the scheme's default.
fn host_header(authority: &Authority, https: bool) -> Option<HeaderValue> {
    let host = authority.host();
    match authority.port_u16() {
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

/// The one policy for an upstream's response headers, whichever backend
/// read them (plain HTTP keeps most as [`RelayedHeaders`] lines, TLS puts
/// all in the map; both are filtered here alike). Dropped: hop-by-hop
/// headers (`Connection` and every name it lists, `Keep-Alive`,
/// `Proxy-Connection`, `Proxy-Authenticate`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`), and `Content-Length` when gptbalance
/// may change the body or the status has no body (1xx, 204, 304). A kept
/// length is written once, however often the upstream repeated it (the
/// framing already refused lengths that disagree).
pub fn relayable_response(parts: &mut http::response::Parts, keep_length: bool) {
    let status = parts.status;
    let keep_length = keep_length
        && !status.is_informational()
        && status != http::StatusCode::NO_CONTENT
        && status != http::StatusCode::NOT_MODIFIED;
    let headers = &mut parts.headers;
    // Usually none: the names the upstream's `Connection` header lists
    // beyond `keep-alive` and `close` (which many send on every response).
    let named: Vec<Vec<u8>> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !hop_by_hop_response(t) && !t.eq_ignore_ascii_case(b"close"))
        .map(<[u8]>::to_vec)
        .collect();
    let dropped = |name: &[u8]| {
        hop_by_hop_response(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name))
    };
    let length = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if length > 0 {
        if !keep_length {
            headers.remove(header::CONTENT_LENGTH);
        } else if length > 1 || headers[header::CONTENT_LENGTH].as_bytes().contains(&b',') {
            let first = headers[header::CONTENT_LENGTH].as_bytes();
            let n = first.split(|&b| b == b',').next().map(<[u8]>::trim_ascii);
            match n.and_then(|n| HeaderValue::from_bytes(n).ok()) {
                Some(one) => {
                    headers.insert(header::CONTENT_LENGTH, one);
                }
                None => {
                    headers.remove(header::CONTENT_LENGTH);
                }
            }
        }
    }
    if headers.keys().any(|n| dropped(n.as_str().as_bytes())) {
        let drop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| dropped(n.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in drop {
            headers.remove(name);
        }
    }
    if let Some(relayed) = parts.extensions.get_mut::<RelayedHeaders>() {
        relayed.retain(|name| !dropped(name));
    }
}

/// Response headers that are never relayed, in any letter case.
fn hop_by_hop_response(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The values of an upstream response header, whichever backend read it:
/// from the header map, then from the lines plain HTTP only relays. For
/// the router's own reading (`retry-after`, quota headers).
pub fn response_header<'a>(
    parts: &'a http::response::Parts,
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let relayed = parts.extensions.get::<RelayedHeaders>();
    parts
        .headers
        .get_all(name)
        .into_iter()
        .map(HeaderValue::as_bytes)
        .chain(relayed.into_iter().flat_map(move |r| {
            r.iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v)
        }))
}

/// A transfer coding gptbalance cannot relay honestly: any but `chunked`
/// (a `gzip` coding stripped with the header would leave an encoded body
/// that says nothing of it). Refused as an invalid answer.
pub(crate) fn foreign_transfer_coding(headers: &HeaderMap) -> bool {
    headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|c| !c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    #[test]
    fn hop_by_hop_response_headers_are_dropped_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("content-type", "application/json"),
            ("Transfer-Encoding", "chunked"),
            ("x-ratelimit-remaining", "9"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("content-length", "12"),
            ("x-ratelimit-remaining", "8"),
            ("upgrade", "h2c"),
        ] {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let names = |h: &HeaderMap| -> Vec<String> {
            let mut all: Vec<String> = h
                .iter()
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                .collect();
            all.sort();
            all
        };
        let relay = |h: &HeaderMap, status: u16, keep_length: bool| {
            let mut resp = Response::new(());
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            *resp.headers_mut() = h.clone();
            let (mut parts, ()) = resp.into_parts();
            relayable_response(&mut parts, keep_length);
            parts.headers
        };
        let kept = relay(&h, 200, true);
        assert_eq!(
            names(&kept),
            [
                "content-length=12",
                "content-type=application/json",
                "x-ratelimit-remaining=8",
                "x-ratelimit-remaining=9",
            ]
        );
        let rewritten = relay(&h, 200, false);
        assert!(!rewritten.contains_key(header::CONTENT_LENGTH));
        assert_eq!(rewritten.len(), 3);
        let plain = HeaderMap::from_iter([(header::SERVER, HeaderValue::from_static("m"))]);
        assert_eq!(names(&relay(&plain, 200, false)), ["server=m"]);
        // What `Connection` names goes too, and so does Proxy-Authenticate;
        // a repeated length is written once, and none without a body.
        let mut odd = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, X-Hop-Secret"),
            ("x-hop-secret", "s"),
            ("proxy-authenticate", "Basic"),
            ("content-length", "197"),
            ("content-length", "197"),
            ("x-kept", "1"),
        ] {
            odd.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        assert_eq!(
            names(&relay(&odd, 200, true)),
            ["content-length=197", "x-kept=1"]
        );
        assert_eq!(names(&relay(&odd, 204, true)), ["x-kept=1"]);
        assert_eq!(names(&relay(&odd, 304, true)), ["x-kept=1"]);
        let listed =
            HeaderMap::from_iter([(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"))]);
        assert_eq!(names(&relay(&listed, 200, true)), ["content-length=5"]);
    }

    #[test]
    fn only_chunked_is_a_relayable_transfer_coding() {
        let te = |v: &'static str| {
            HeaderMap::from_iter([(header::TRANSFER_ENCODING, HeaderValue::from_static(v))])
        };
        assert!(!foreign_transfer_coding(&HeaderMap::new()));
        assert!(!foreign_transfer_coding(&te("chunked")));
        assert!(!foreign_transfer_coding(&te(" Chunked ")));
        assert!(foreign_transfer_coding(&te("gzip")));
        assert!(foreign_transfer_coding(&te("gzip, chunked")));
    }

    /// A TLS upstream on 127.0.0.1 offering `alpn`, answering every request
    /// with its HTTP version, path and `Host`; returns its port, the
    /// certificate and a count of TCP connections accepted.
    async fn tls_upstream(
        dir: &std::path::Path,
        alpn: &[&[u8]],
    ) -> (u16, CertificateDer<'static>, Arc<AtomicUsize>) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            // An end-entity certificate that is its own trust anchor.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is needed for this test");
        assert!(out.status.success());
        let cert = CertificateDer::from_pem_file(&cert).unwrap();
        let key = PrivateKeyDer::from_pem_file(&key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let text = format!("{:?} {} {host}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            text,
                        ))))
                    });
                    let io = hyper_util::rt::TokioIo::new(tls);
                    if h2 {
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
        (port, cert, accepted)
    }

    fn trusting(cert: CertificateDer<'static>) -> Connector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    }

    async fn get(port: u16, timeout: Duration) -> String {
        let req = Request::builder()
            .uri(format!("https://127.0.0.1:{port}/v1/models"))
            .body(Bytes::new())
            .unwrap();
        let resp = UpstreamClients::default()
            .send(timeout, req.into())
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn tls_upstreams_speak_http2_when_offered_and_reuse_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (port, cert, accepted) = tls_upstream(dir.path(), &[b"h2", b"http/1.1"]).await;
        let timeout = Duration::from_millis(4321);
        install_connector(timeout, trusting(cert));
        for _ in 0..3 {
            // HTTP/2 carries the authority in the URI, not in `Host`.
            assert_eq!(get(port, timeout).await, "HTTP/2.0 /v1/models -");
        }
        let both = tokio::join!(get(port, timeout), get(port, timeout));
        assert_eq!(both.0, both.1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tls_upstreams_without_http2_get_http1_with_host_and_pooled_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (port, cert, accepted) = tls_upstream(dir.path(), &[b"http/1.1"]).await;
        let timeout = Duration::from_millis(4322);
        install_connector(timeout, trusting(cert));
        for _ in 0..3 {
            assert_eq!(
                get(port, timeout).await,
                format!("HTTP/1.1 /v1/models 127.0.0.1:{port}")
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Two at once need two HTTP/1.1 connections; both are kept.
        tokio::join!(get(port, timeout), get(port, timeout));
        tokio::join!(get(port, timeout), get(port, timeout));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An upstream that refuses a large body with an early 413 and closes,
    /// without reading it: the 413 is the response, as with hyper.
    #[tokio::test]
    async fn an_early_answer_to_a_request_still_being_written_is_the_response() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head).await;
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo long")
                .await;
            // Dropped with the body unread: the kernel resets the connection.
        });
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .body(Bytes::from(vec![b'x'; 32 << 20]))
            .unwrap();
        let resp = UpstreamClients::default()
            .send(Duration::from_secs(5), req.into())
            .await
            .expect("the early answer is the response");
        assert_eq!(resp.status(), 413);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"too long");
    }

    /// An upstream that answers a large body early and then neither reads
    /// nor closes: the answer is the response, without waiting.
    #[tokio::test]
    async fn an_early_answer_on_a_connection_left_open_is_the_response() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head).await;
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo long")
                .await
                .unwrap();
            // Holds the connection open, unread, until the test ends.
            let _ = done_rx.await;
        });
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .body(Bytes::from(vec![b'x'; 32 << 20]))
            .unwrap();
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            UpstreamClients::default().send(Duration::from_secs(5), req.into()),
        )
        .await
        .expect("the answer comes without waiting for the body to be taken")
        .unwrap();
        assert_eq!(resp.status(), 413);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"too long");
        drop(done_tx);
    }

    /// Plain-HTTP requests in turn share one pooled connection; a response
    /// read to its end hands it back.
    #[tokio::test]
    async fn plain_http_connections_are_pooled_and_reused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // Each request here arrives in one read (small, loopback).
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        for _ in 0..3 {
            let req = Request::post(format!("http://{addr}/v1/x"))
                .body(Bytes::from_static(b"{}"))
                .unwrap();
            let resp = UpstreamClients::default()
                .send(Duration::from_secs(5), req.into())
                .await
                .unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An idle plain connection the upstream closes is closed by the next
    /// sweep, with no request needed.
    #[tokio::test]
    async fn the_sweep_closes_idle_connections_the_upstream_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            drop(s);
            let _ = closed_tx.send(());
        });
        let req = Request::post(format!("http://{addr}/v1/x"))
            .body(Bytes::new())
            .unwrap();
        let resp = UpstreamClients::default()
            .send(Duration::from_secs(5), req.into())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        let idle = || {
            POOL.with(|p| {
                p.borrow()
                    .upstreams
                    .iter()
                    .filter(|(k, _)| k.authority.as_str() == addr.to_string())
                    .map(|(_, up)| up.plain.len())
                    .sum::<usize>()
            })
        };
        assert_eq!(idle(), 1, "the connection is pooled");
        closed_rx.await.unwrap();
        let mut swept = false;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sweep_idle_connections();
            if idle() == 0 {
                swept = true;
                break;
            }
        }
        assert!(swept);
    }

    #[test]
    fn host_names_the_port_only_when_not_the_default() {
        let uri = |s: &str| s.parse::<Uri>().unwrap().authority().unwrap().clone();
        assert_eq!(
            host_header(&uri("https://a.example/v1"), true).unwrap(),
            "a.example"
        );
        assert_eq!(
            host_header(&uri("https://a.example:443/v1"), true).unwrap(),
            "a.example"
        );
        assert_eq!(
            host_header(&uri("http://a.example:8443/v1"), false).unwrap(),
            "a.example:8443"
        );
        assert_eq!(
            host_header(&uri("http://[::1]:80/v1"), false).unwrap(),
            "[::1]"
        );
    }
}
