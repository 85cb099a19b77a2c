//! The accept loop and graceful drain.
//!
//! `run` takes a bound listener and a shutdown future, so tests bind port 0
//! and know the address before the first request. A plain connection starts
//! on the HTTP/1.1 fast path (`fast.rs`) and goes to hyper when a request
//! needs it; with `server.tls`, a connection's TLS handshake (bounded by
//! `header_read_timeout`) comes first and hyper serves it all (`tls.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::api_error::ApiError;
use super::body::{BoxError, ResponseBody};
use super::drain::drained;
use super::fast;
use super::framing::Watched;
use super::handler;
use super::idle::{Busy, Idle};
use super::plain::RelayedHeaders;
use super::upstream;
use crate::state::AppState;

/// Serves until `shutdown` resolves, then stops accepting and lets open
/// requests finish for up to `server.shutdown_grace` before cutting them.
/// Speaks TLS when the config has `server.tls` as `run` starts, for the
/// listener's whole life.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let server_cfg = state.table.load().config.server.clone();
    let tls = super::tls::acceptor(&state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_cfg.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    // Every connection task holds a receiver: `true` asks it to finish its
    // request and close, and the sender sees when the last one is gone.
    let (draining_tx, draining_rx) = watch::channel(false);
    let _heartbeat = AbortOnDrop(tokio::spawn(timer_heartbeat()));
    // Beyond max_connections (across every worker), a worker holds the
    // connection it accepted until a slot frees, and accepts no other
    // meanwhile: the rest wait in the listen backlog. A slot is taken
    // after the accept, never held while waiting for one: the kernel picks
    // the worker a connection goes to, and a slot held by a worker that
    // gets none would leave another's connection waiting for nothing.
    let slots = state.connection_slots.clone();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let draining = draining_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, peer, state, &builder, draining).await,
                Some(tls) => serve_tls(tls, stream, peer, state, &builder, draining).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(draining_rx);
    let _ = draining_tx.send(true);
    let grace = state.table.load().config.server.shutdown_grace;
    tracing::debug!(
        open_connections = draining_tx.receiver_count(),
        ?grace,
        "worker draining"
    );
    if tokio::time::timeout(grace, draining_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("shutdown_grace elapsed; cutting the remaining connections");
    }
}

/// One connection: the fast path first, then hyper if a request needs it.
async fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    draining: watch::Receiver<bool>,
) {
    let io = match fast::serve(stream, Some(peer), state.clone(), draining.clone()).await {
        fast::Exit::Closed => return,
        fast::Exit::HandOff(io) => io,
    };
    let aborted = io.abort_flag();
    serve_with_hyper(io, aborted, peer, state, builder, draining).await;
}

/// One TLS connection: the handshake, then hyper. A client that sends no
/// ClientHello, or stalls in the handshake, is closed after
/// `header_read_timeout`, as one that sends no head is.
async fn serve_tls(
    tls: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    mut draining: watch::Receiver<bool>,
) {
    let limit = state.table.load().config.server.header_read_timeout;
    let handshake = tokio::time::timeout(limit, tls.accept(stream));
    let io = tokio::select! {
        done = handshake => match done {
            Ok(Ok(io)) => super::tls::TlsConn::new(io),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, ?limit, "TLS handshake not done within header_read_timeout");
                return;
            }
        },
        _ = drained(&mut draining) => return,
    };
    let aborted = io.abort_flag();
    serve_with_hyper(io, aborted, peer, state, builder, draining).await;
}

/// hyper serves the rest of a connection's life: HTTP/2, or HTTP/1.1
/// requests the fast path does not take, or a TLS connection.
async fn serve_with_hyper<IO>(
    io: IO,
    aborted: Arc<AtomicBool>,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    mut draining: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (io, framing) = Watched::new(TokioIo::new(io));
    let keepalive = state.table.load().config.server.keepalive_timeout;
    let idle = Idle::new();
    let requests = idle.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let busy = requests.busy();
        // An HTTP/2 stream is reset on its own; only an HTTP/1 response
        // needs its connection reset.
        let aborted = (req.version() != http::Version::HTTP_2).then(|| aborted.clone());
        let conflicting = framing.next_request_conflicts();
        let connect = req.method() == http::Method::CONNECT;
        let answer = handler::handle(state.clone(), req, conflicting, Some(peer));
        async move {
            if connect {
                // Not a tunnel: refused, and the connection closed, so
                // nothing after it is read as a tunnel or as requests.
                let msg = "CONNECT is not served".to_owned();
                let mut resp = ApiError::MethodNotAllowed(msg).into_response(None);
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(resp.map(|body| MarksAbort {
                    body,
                    aborted: aborted.clone(),
                    _busy: busy,
                }));
            }
            let (mut parts, body) = answer.await?.into_parts();
            // hyper writes only the header map.
            RelayedHeaders::merge(&mut parts.extensions, &mut parts.headers);
            let body = MarksAbort {
                body,
                aborted: aborted.clone(),
                _busy: busy,
            };
            Ok::<_, std::convert::Infallible>(http::Response::from_parts(parts, body))
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        // The connection first: a request it has already read is served
        // before a drain that began meanwhile stops it.
        biased;
        ended = conn.as_mut() => ended,
        _ = drained(&mut draining) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = idle.expired(keepalive) => {
            tracing::debug!(%peer, ?keepalive, "idle connection closed after keepalive_timeout");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A response body on a connection hyper serves: when it fails (the
/// upstream's body was cut), the connection is marked so that closing it
/// resets it, as the fast path does. hyper returns the body's error
/// without a shutdown (no FIN), and the connection is dropped after.
struct MarksAbort {
    body: ResponseBody,
    aborted: Option<Arc<AtomicBool>>,
    /// The request counts as in flight until its body is dropped.
    _busy: Busy,
}

impl http_body::Body for MarksAbort {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let (Poll::Ready(Some(Err(_))), Some(aborted)) = (&polled, &self.aborted) {
            aborted.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Keeps this runtime's timer driver waking at least once a second. Arming
/// a timer earlier than the driver's next wake-up makes tokio interrupt the
/// driver through its eventfd, one system call; the header-read and attempt
/// timers armed for every request are all longer than a second, so with
/// this beat none of them needs it. Costs one wake-up a second. Every tenth
/// beat also sweeps this thread's idle upstream connections.
async fn timer_heartbeat() {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        beat.tick().await;
        if n % 10 == 0 {
            upstream::sweep_idle_connections();
        }
    }
}

/// Stops the task when `run` ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
