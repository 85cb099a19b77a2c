//! The hand-off to hyper: it serves the rest of a connection's life when
//! the server's HTTP/1.1 loop hands a connection over (HTTP/2, HTTP/1.0,
//! chunked or odd requests), and every TLS connection. The CL+TE guard
//! (`http1::guard`) watches the bytes hyper reads; every request goes to
//! the same `handler::handle` as the loop's; a response body that fails
//! marks the connection so that closing it resets it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use super::idle::{Busy, Idle};
use super::Drain;
use crate::http1::guard::Watched;
use crate::http1::head::RelayedHeaders;
use crate::proxy::api_error::ApiError;
use crate::proxy::body::{BoxError, ResponseBody};
use crate::proxy::handler;
use crate::proxy::ratelimit::RateLimitHeaders;
use crate::state::AppState;

/// hyper serves the rest of a connection's life: HTTP/2, or HTTP/1.1
/// requests the fast path does not take, or a TLS connection.
pub(super) async fn serve_with_hyper<IO>(
    io: IO,
    aborted: Arc<AtomicBool>,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    mut drain: Drain,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (io, framing) = Watched::new(io);
    let io = TokioIo::new(io);
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
        let answer = handler::handle(state.clone(), req, conflicting, Some(peer), None);
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
            RateLimitHeaders::merge(&mut parts.extensions, &mut parts.headers);
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
        () = drain.started() => {
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
