//! This thread's upstream connections: one pool per worker thread, keyed
//! by scheme and authority, so a request never hops threads and the pool
//! needs no lock. HTTP/1.1 connections are reused one request at a time,
//! an HTTP/2 connection (when TLS negotiates it) is shared; idle ones are
//! swept by the worker's heartbeat. Pools outlive reloads.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::Authority;
use http::Uri;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use tower_service::Service;

use super::{h1_client, host_header, SendError};
use crate::routing::table::Fnv;

pub(super) type Connector = HttpsConnector<HttpConnector>;

/// An idle connection unused this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per upstream and thread.
pub(super) const MAX_IDLE: usize = 1024;
/// How often a busy thread looks for idle connections past IDLE_TIMEOUT
/// under upstreams it no longer uses.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(super) struct PoolKey {
    pub(super) https: bool,
    pub(super) authority: Authority,
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

pub(super) struct Release {
    pub(super) key: PoolKey,
    pub(super) sender: http1::SendRequest<Full<Bytes>>,
}

pub(super) enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

pub(super) struct Idle {
    pub(super) sender: http1::SendRequest<Full<Bytes>>,
    pub(super) since: Instant,
}

pub(super) struct IdlePlain {
    pub(super) conn: h1_client::Conn,
    pub(super) since: Instant,
}

#[derive(Default)]
pub(super) struct Upstream {
    /// Oldest at the front; the newest (warmest) is used first.
    pub(super) h1: VecDeque<Idle>,
    /// Plain-HTTP connections, oldest at the front.
    pub(super) plain: VecDeque<IdlePlain>,
    pub(super) h2: Option<http2::SendRequest<Full<Bytes>>>,
    /// The `Host` header for HTTP/1.1 requests, made once.
    pub(super) host: Option<HeaderValue>,
}

impl Upstream {
    pub(super) fn take(&mut self, now: Instant) -> Option<Sender> {
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

    pub(super) fn drop_stale(&mut self, now: Instant) {
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

pub(super) struct Pool {
    pub(super) upstreams: HashMap<PoolKey, Upstream, BuildHasherDefault<Fnv>>,
    /// By connect timeout and extra roots (their address; 0 for none).
    pub(super) connectors: HashMap<(Duration, usize), Connector>,
    pub(super) last_sweep: Instant,
}

thread_local! {
    pub(super) static POOL: RefCell<Pool> = RefCell::new(Pool {
        upstreams: HashMap::default(),
        connectors: HashMap::new(),
        last_sweep: Instant::now(),
    });
}

impl Pool {
    /// An idle connection to `key`'s upstream, if any, and its `Host`.
    pub(super) fn take(
        &mut self,
        key: &PoolKey,
        now: Instant,
    ) -> (Option<Sender>, Option<HeaderValue>) {
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
    pub(super) fn take_plain(
        &mut self,
        key: &PoolKey,
        now: Instant,
    ) -> (Option<h1_client::Conn>, Option<HeaderValue>) {
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

    pub(super) fn put_plain(&mut self, key: PoolKey, conn: h1_client::Conn) {
        let now = Instant::now();
        let up = self.upstreams.entry(key).or_default();
        up.plain.push_back(IdlePlain { conn, since: now });
        if up.plain.len() > MAX_IDLE {
            up.plain.pop_front();
        }
    }

    pub(super) fn put(&mut self, key: PoolKey, sender: http1::SendRequest<Full<Bytes>>) {
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
    pub(super) fn sweep(&mut self, now: Instant) {
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
pub(super) fn install_connector(connect_timeout: Duration, connector: Connector) {
    POOL.with(|p| {
        p.borrow_mut()
            .connectors
            .insert((connect_timeout, 0), connector)
    });
}

/// This thread's connector for this connect timeout (a cheap handle clone).
pub(super) fn connector(
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

pub(super) fn build_connector(
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
pub(super) async fn connect(
    mut connector: Connector,
    uri: &Uri,
    key: &PoolKey,
) -> Result<Sender, SendError> {
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
