//! The client side: how a request reaches an upstream and its answer
//! comes back.
//!
//! An attempt builds its [`request::Outgoing`] (URL, the header policy
//! for what goes upstream) and calls [`UpstreamClients::send`], here,
//! which takes a connection from this thread's pool (`pool`) or opens
//! one: a plain-HTTP upstream is spoken to by [`h1_client`] on the
//! request's own task, a TLS one through hyper (HTTP/1.1 or HTTP/2 by
//! ALPN). The answer's headers go through the one response policy
//! (`response`) whichever backend read them, and its body
//! ([`UpstreamBody`], `body`) hands an HTTP/1.1 connection back to the
//! pool once read to the end. A request never hops threads; redirects are
//! never followed: a key is sent only to its `base_url`.

mod body;
pub mod h1_client;
mod pool;
pub mod request;
mod response;

use body::Inner;
pub use body::{BodyError, UpstreamBody};
pub use pool::sweep_idle_connections;
use pool::{connect, connector, Connector, PoolKey, Release, Sender, POOL};
use response::foreign_transfer_coding;
pub use response::{relayable_response, response_header};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use rustls::pki_types::CertificateDer;

use h1_client::{WireError, Written, FOREIGN_CODING};
use request::Outgoing;

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
    pub fn send<'r>(
        &self,
        connect_timeout: Duration,
        req: Outgoing<'r>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'r {
        self.send_at(connect_timeout, req, Instant::now())
    }

    /// [`UpstreamClients::send`] with the caller's reading of the clock
    /// (`now`, for the pool's idle times): the attempt has just read it.
    ///
    /// Not an `async fn`: the connection is chosen when called, and the
    /// future is the plain or TLS sender's own. An `async fn` around them
    /// would hold `req` twice (its argument and the sender's), and an
    /// attempt's future, which holds this one, is moved whole.
    pub fn send_at<'r>(
        &self,
        connect_timeout: Duration,
        req: Outgoing<'r>,
        now: Instant,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'r {
        let Some(authority) = req.uri.authority().cloned() else {
            return Either::Left(std::future::ready(Err(SendError::NoHost)));
        };
        let key = PoolKey {
            https: req.uri.scheme() == Some(&Scheme::HTTPS),
            authority,
        };
        if !key.https {
            return Either::Right(Either::Left(send_plain(connect_timeout, req, key, now)));
        }
        let req = req.into_request();
        let uri = req.uri().clone();
        let connector = connector(connect_timeout, self.extra_roots.as_ref());
        // Boxed: the TLS path's future is large, and inline it would make
        // every plain-HTTP request's future (and each one awaiting it) as
        // large, to be moved whole at every level.
        Either::Right(Either::Right(Box::pin(send_tls(
            connector, req, uri, key, now,
        ))))
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
            None => Box::pin(h1_client::Conn::connect(&key.authority, connect_timeout)).await?,
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

/// The error and its causes on one line; hyper's errors carry no URL or header.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::pool::install_connector;
    use super::*;
    use http::{HeaderMap, HeaderName};
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
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
