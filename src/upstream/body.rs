//! The response body of an upstream request, from either backend: hyper's
//! (TLS) or the plain-HTTP client's; an HTTP/1.1 connection goes back to
//! this thread's pool once its body has been read to the end, and a body
//! dropped early closes it.

use super::pool::{PoolKey, Release, POOL};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;

use h1_client::{PlainBody, WireError};

use super::h1_client;

/// Why an upstream response body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The response body of an upstream request; hands its HTTP/1.1 connection
/// back to this thread's pool once read to the end.
pub struct UpstreamBody {
    pub(super) inner: Inner,
    /// Where an HTTP/1.1 connection goes back to; `None` once it has.
    pub(super) key: Option<PoolKey>,
}

pub(super) enum Inner {
    Hyper {
        body: Incoming,
        sender: Option<http1::SendRequest<Full<Bytes>>>,
    },
    Plain(PlainBody),
}

impl UpstreamBody {
    pub(super) fn hyper(body: Incoming, release: Option<Release>) -> UpstreamBody {
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
    pub(super) fn release_if_done(&mut self) {
        if self.is_end_stream() {
            self.release();
        }
    }

    /// Returns the connection to the pool: the body has been read to its end.
    pub(super) fn release(&mut self) {
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
    pub(super) fn forget_connection(&mut self) {
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
