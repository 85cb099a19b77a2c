//! The server's own HTTP/1.1 loop: the usual request served on a
//! read/write loop of its own, without hyper's per-request machinery.
//!
//! The usual request is a GET or POST in HTTP/1.1, in origin form, with a
//! `Content-Length` body or none, and no `Transfer-Encoding`, `Expect` or
//! `Upgrade`: what the OpenAI SDKs send. Anything else (HTTP/2's preface,
//! HTTP/1.0, chunked or conflicting framing, other methods, a head over
//! 64 KiB or over 100 headers, anything httparse refuses) hands the
//! connection, with the bytes already read and not yet used, to hyper for
//! the rest of its life; hyper's answers to odd requests stay the answers.
//! Plaintext only: a TLS connection (`server.tls`) never comes here, hyper
//! serves it from its handshake on (`tls`).
//!
//! Semantics kept from hyper's server: a new connection's first head must
//! arrive within `header_read_timeout` of its accept, as hyper's timer
//! starts as soon as it waits (else the connection closes without an
//! answer); requests on a connection are answered in order;
//! a response carries `Date`; its body is framed by its `Content-Length`,
//! else by its exact size, else chunked; a connection closes after a
//! `Connection: close` request, a body not read to its end, a response
//! body that failed, or once the server is draining. Beyond hyper: an
//! idle keep-alive connection closes when no next head has begun within
//! `keepalive_timeout` (hyper bounds that wait by `header_read_timeout`),
//! and a head that has begun must finish within `header_read_timeout`.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conn::{reset_on_close, HandedOff};
use super::Drain;
use crate::http1::framing::{self, push_decimal, Connection};
use crate::http1::head::{push_field, RelayedHeaders, MAX_HEAD, MAX_HEADERS};
use crate::http1::{chunked, names};
use crate::proxy::body::ResponseBody;
use crate::proxy::handler::{self, BodyCut};
use crate::proxy::ratelimit::RateLimitHeaders;
use crate::state::AppState;

/// Room kept free in the read buffer before each read.
const READ_ROOM: usize = 4 * 1024;
/// Largest piece of a request body read at once.
const BODY_CHUNK: usize = 64 * 1024;
/// Response bytes gathered before a write; a larger data frame is written
/// on its own, not copied.
const GATHER: usize = 16 * 1024;

/// How a connection left the fast path.
pub enum Exit {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// A request the fast path does not serve: hyper takes the connection,
    /// starting with these bytes.
    HandOff(HandedOff<TcpStream>),
}

/// Serves requests on `io` until the connection ends, the server drains
/// (`draining` turns true), or a request needs hyper.
pub async fn serve(
    io: TcpStream,
    peer: Option<std::net::SocketAddr>,
    state: Arc<AppState>,
    drain: Drain,
) -> Exit {
    // Made once per connection, not per wait for a request: it registers
    // with the drain signal on its first wait and stays registered, where
    // a new one per wait would register and deregister (two locks) each
    // time.
    let mut watch = drain.clone();
    let mut drained = std::pin::pin!(watch.started());
    let mut conn = Conn {
        io,
        buf: BytesMut::with_capacity(READ_ROOM),
        out: Vec::with_capacity(1024),
    };
    let mut head_timeout = state.table.load().config.server.header_read_timeout;
    // One timer for the connection's life, moved on rather than made anew
    // per wait (moving it later takes no lock): a new connection must send
    // its first head within `header_read_timeout`, as hyper's does; after
    // a response, the next head must begin within `keepalive_timeout`.
    let mut wait = std::pin::pin!(tokio::time::sleep(head_timeout));
    let mut first = true;
    loop {
        let head = match conn
            .read_head(
                (!first).then_some(head_timeout),
                wait.as_mut(),
                &drain,
                drained.as_mut(),
            )
            .await
        {
            HeadRead::Head(h) => h,
            HeadRead::Closed => return Exit::Closed,
            HeadRead::HandOff => return Exit::HandOff(HandedOff::new(conn.buf.freeze(), conn.io)),
        };
        first = false;
        let (limit, keepalive) = {
            let table = state.table.load();
            let server = &table.config.server;
            head_timeout = server.header_read_timeout;
            (server.max_body_bytes, server.keepalive_timeout)
        };
        let gap = head_timeout;
        let mut keep_alive = head.keep_alive;
        // A request without a valid token is refused on its head: its
        // body is never read, and the connection closes after the answer.
        let presented = match handler::check_head(&state, head.uri.path(), &head.headers, peer) {
            Ok(hash) => hash,
            Err(refused) => {
                let parts = (&head.method, &head.uri, &head.headers);
                crate::proxy::access::log_refused(&state, parts, peer, refused.status());
                let _ = conn.write_response(*refused, false).await;
                return Exit::Closed;
            }
        };
        let body = match head.length {
            0 => FastBody::Full(None),
            n if n > limit => {
                // Refused from its Content-Length alone; the body is never
                // read, so the connection cannot carry another request.
                keep_alive = false;
                FastBody::TooLarge
            }
            n => match conn.read_body(n, gap).await {
                Some(b) => FastBody::Full(Some(b)),
                None => {
                    keep_alive = false;
                    FastBody::Stalled
                }
            },
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        // While the answer is being made, the connection is watched: a
        // caller that goes away cancels the request (and its upstream one).
        let resp = tokio::select! {
            // In order: no random draw per request.
            biased;
            resp = handler::handle(state.clone(), req, false, peer, presented) => match resp {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            () = conn.gone() => return Exit::Closed,
        };
        keep_alive &= !drain.is_draining();
        if !conn.write_response(resp, keep_alive).await {
            return Exit::Closed;
        }
        wait.as_mut().reset(tokio::time::Instant::now() + keepalive);
    }
}

/// A parsed request head the fast path serves.
pub(super) struct Head {
    pub(super) method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// Body length (0 when there is none).
    pub(super) length: u64,
    keep_alive: bool,
}

// Returned once per request and unpacked at once: boxing the head
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(Head),
    Closed,
    HandOff,
}

// Returned once per request and unpacked at once: boxing the head
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Parsed {
    Partial,
    HandOff,
    Head(Head, usize),
}

struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The response being gathered for one write.
    out: Vec<u8>,
}

impl Conn {
    /// Reads until a whole head is buffered, or `wait` (the connection's
    /// timer) ends. Waiting for a new request also ends when the server
    /// drains. `restart`: a head that begins is given this long from its
    /// first byte (a keep-alive connection's next head); `None` leaves the
    /// timer as it is (a new connection's first head).
    async fn read_head(
        &mut self,
        restart: Option<Duration>,
        mut wait: Pin<&mut tokio::time::Sleep>,
        drain: &Drain,
        mut drained: Pin<&mut impl Future<Output = ()>>,
    ) -> HeadRead {
        let mut restart = restart;
        loop {
            if !self.buf.is_empty() {
                match parse(&self.buf) {
                    Parsed::Head(head, len) => {
                        self.buf.advance(len);
                        return HeadRead::Head(head);
                    }
                    Parsed::HandOff => return HeadRead::HandOff,
                    Parsed::Partial if self.buf.len() >= MAX_HEAD => return HeadRead::HandOff,
                    // The head has begun: it must finish within the
                    // timeout from here. (A head read whole never reads
                    // the clock.)
                    Parsed::Partial => {
                        if let Some(timeout) = restart.take() {
                            wait.as_mut().reset(tokio::time::Instant::now() + timeout);
                        }
                    }
                }
            }
            self.make_room();
            let read = if self.buf.is_empty() {
                if drain.is_draining() {
                    return HeadRead::Closed;
                }
                tokio::select! {
                    biased;
                    r = self.io.read_buf(&mut self.buf) => r,
                    // Polled only until it resolves: then the connection closes.
                    () = drained.as_mut() => return HeadRead::Closed,
                    () = wait.as_mut() => return HeadRead::Closed,
                }
            } else {
                tokio::select! {
                    biased;
                    r = self.io.read_buf(&mut self.buf) => r,
                    () = wait.as_mut() => return HeadRead::Closed,
                }
            };
            match read {
                Ok(0) | Err(_) => return HeadRead::Closed,
                Ok(_) => {}
            }
        }
    }

    /// Resolves when the caller closes the connection.
    async fn gone(&mut self) {
        poll_fn(|cx| self.poll_gone(cx)).await
    }

    /// Ready when the caller has closed the connection. Bytes it sends
    /// meanwhile are kept; once some are (a pipelined request), a close is
    /// no longer taken for leaving: it may be a half-close after the last
    /// request, as hyper allows.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.buf.is_empty() {
            match self.io.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            self.make_room();
            match self.io.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            }
        }
        Poll::Pending
    }

    /// Reads a `length`-byte body; each read must come within `gap` of
    /// the one before. `None` when the caller stalled or went away.
    async fn read_body(&mut self, length: u64, gap: Duration) -> Option<Bytes> {
        let length = usize::try_from(length).ok()?;
        if self.buf.len() >= length {
            // Copied out, so the read buffer stays this connection's alone
            // and is reused in place for the next request.
            let body = Bytes::copy_from_slice(&self.buf[..length]);
            self.buf.advance(length);
            return Some(body);
        }
        // Grown as the bytes come, not allocated whole from the declared
        // length: a caller declaring max_body_bytes and sending nothing
        // holds no more than a chunk.
        let mut body = BytesMut::with_capacity(length.min(BODY_CHUNK));
        body.extend_from_slice(&self.buf);
        self.buf.clear();
        while body.len() < length {
            let want = (length - body.len()).min(BODY_CHUNK);
            body.reserve(want);
            // Never past the body: what follows is the next request's.
            let mut limited = (&mut self.io).take(want as u64);
            match tokio::time::timeout(gap, limited.read_buf(&mut body)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        Some(body.freeze())
    }

    /// Keeps `READ_ROOM` free at the end of the read buffer, moving what
    /// is left to the front when the buffer is this connection's alone.
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
            self.buf.reserve(READ_ROOM);
        }
    }

    /// Writes `resp`; true when the connection can take another request.
    async fn write_response(
        &mut self,
        resp: http::Response<ResponseBody>,
        keep_alive: bool,
    ) -> bool {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let mut keep_alive = keep_alive;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut length: Option<u64> = None;
        let mut has_date = false;
        let bodiless = status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status.is_informational();
        // A limited caller's `x-ratelimit-*` lines, written below, replace
        // an upstream's of the same names.
        let ratelimit = parts.extensions.get::<RateLimitHeaders>();
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                // One length at most, and none where there is no body, as
                // hyper writes it.
                if bodiless || length.is_some() {
                    continue;
                }
                length = framing::content_length(value.as_bytes());
                if length.is_none() {
                    continue;
                }
            } else if name == header::TRANSFER_ENCODING {
                continue;
            } else if name == header::CONNECTION {
                if Connection::of(value.as_bytes()).close {
                    keep_alive = false;
                }
                continue;
            } else if name == header::DATE {
                has_date = true;
            } else if ratelimit.is_some_and(|r| r.replaces(name)) {
                continue;
            }
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(relayed) = parts.extensions.get::<RelayedHeaders>() {
            for (name, value) in relayed.iter() {
                push_field(out, name, value);
            }
        }
        if let Some(r) = ratelimit {
            r.write(out);
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            DATE.with(|d| out.extend_from_slice(d.borrow_mut().now()));
            out.extend_from_slice(b"\r\n");
        }
        let mut chunked = false;
        if !bodiless && length.is_none() {
            if let Some(n) = body.size_hint().exact() {
                length = Some(n);
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            } else {
                chunked = true;
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if bodiless {
            return self.flush().await.is_ok() && keep_alive;
        }
        let mut body = body;
        let mut sent: u64 = 0;
        loop {
            let step = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending if !self.out.is_empty() => Poll::Ready(Step::Flush),
                // Nothing to write: meanwhile, a caller that leaves
                // cancels the response (and its upstream request).
                Poll::Pending => match self.poll_gone(cx) {
                    Poll::Ready(()) => Poll::Ready(Step::Gone),
                    Poll::Pending => Poll::Pending,
                },
                Poll::Ready(None) => Poll::Ready(Step::End),
                Poll::Ready(Some(Err(_))) => Poll::Ready(Step::Failed),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Step::Frame(frame)),
            })
            .await;
            match step {
                Step::Gone => return false,
                Step::Flush => {
                    if self.flush().await.is_err() {
                        return false;
                    }
                }
                Step::Frame(frame) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    if length.is_some_and(|n| sent > n) {
                        // More than the declared length: never sent.
                        let _ = self.flush().await;
                        reset_on_close(&self.io);
                        return false;
                    }
                    if chunked {
                        chunked::push_size(&mut self.out, data.len());
                    }
                    if data.len() > GATHER {
                        if self.flush().await.is_err() || self.io.write_all(&data).await.is_err() {
                            return false;
                        }
                    } else {
                        self.out.extend_from_slice(&data);
                        if self.out.len() >= GATHER && self.flush().await.is_err() {
                            return false;
                        }
                    }
                    if chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                    if length == Some(sent) {
                        // All the declared bytes: done, as hyper would be,
                        // without polling the body for its end.
                        return self.flush().await.is_ok() && keep_alive;
                    }
                }
                Step::Failed => {
                    // Cut: the caller sees a body that ends early (no
                    // last chunk, or short of its length) and a reset,
                    // never a clean close.
                    let _ = self.flush().await;
                    reset_on_close(&self.io);
                    return false;
                }
                Step::End => {
                    if chunked {
                        self.out.extend_from_slice(chunked::LAST_CHUNK);
                    }
                    let whole = length.is_none_or(|n| sent == n);
                    return self.flush().await.is_ok() && whole && keep_alive;
                }
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 4 * GATHER {
                self.out.shrink_to(GATHER);
            }
        }
        Ok(())
    }
}

enum Step {
    Flush,
    Gone,
    Frame(Frame<Bytes>),
    Failed,
    End,
}

/// Parses the head at the start of `buf`, deciding whether the fast path
/// serves it. The head is copied once; the path and header values are
/// slices of that copy (one allocation, not one per header), and the read
/// buffer is not shared with them.
pub(super) fn parse(buf: &[u8]) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOff,
    };
    if req.version != Some(1) {
        return Parsed::HandOff;
    }
    let method = match req.method {
        Some("POST") => Method::POST,
        Some("GET") => Method::GET,
        _ => return Parsed::HandOff,
    };
    let path = req.path.unwrap_or("");
    if !path.starts_with('/') {
        return Parsed::HandOff;
    }
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let slice = |part: &[u8]| {
        let at = part.as_ptr() as usize - base;
        head.slice(at..at + part.len())
    };
    let uri = match usual_uri(path) {
        Some(uri) => uri,
        None => match Uri::from_maybe_shared(slice(path.as_bytes())) {
            Ok(uri) => uri,
            Err(_) => return Parsed::HandOff,
        },
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut length: Option<u64> = None;
    let mut connection = Connection::default();
    for h in req.headers.iter() {
        let Some(name) = names::name(h.name.as_bytes()) else {
            return Parsed::HandOff;
        };
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Parsed::HandOff;
        }
        if name == header::CONTENT_LENGTH {
            // One plain number; a list, a repeat or anything odd goes
            // to hyper.
            if length.is_some() {
                return Parsed::HandOff;
            }
            match framing::decimal(h.value) {
                Some(n) => length = Some(n),
                None => return Parsed::HandOff,
            }
        } else if name == header::CONNECTION {
            connection.add(h.value);
            if connection.upgrade {
                return Parsed::HandOff;
            }
        }
        let Some(value) = names::value(slice(h.value)) else {
            return Parsed::HandOff;
        };
        headers.append(name, value);
    }
    Parsed::Head(
        Head {
            method,
            uri,
            headers,
            length: length.unwrap_or(0),
            keep_alive: !connection.close,
        },
        len,
    )
}

/// The paths of the usual endpoints (`USUAL_ENDPOINTS` under `/v1/`).
const USUAL_PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
];

/// The URI of a usual endpoint's path, parsed once: a copy of it shares
/// static bytes, where parsing the path cost about a hundredth of a
/// request's instructions.
fn usual_uri(path: &str) -> Option<Uri> {
    static URIS: LazyLock<[Uri; 6]> = LazyLock::new(|| USUAL_PATHS.map(Uri::from_static));
    let i = USUAL_PATHS.iter().position(|p| *p == path)?;
    Some(URIS[i].clone())
}

/// A request body the fast path has read (or given up on).
pub enum FastBody {
    Full(Option<Bytes>),
    /// The caller stopped sending it: reading it fails with `BodyStalled`.
    Stalled,
    /// Its Content-Length is over `max_body_bytes`; it was not read.
    TooLarge,
}

impl Body for FastBody {
    type Data = Bytes;
    type Error = BodyCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyCut>>> {
        Poll::Ready(match self.get_mut() {
            FastBody::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            FastBody::Stalled => Some(Err(BodyCut::Stalled)),
            FastBody::TooLarge => Some(Err(BodyCut::TooLarge)),
        })
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, FastBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FastBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            FastBody::Stalled | FastBody::TooLarge => SizeHint::default(),
        }
    }
}

thread_local! {
    static DATE: std::cell::RefCell<DateCache> = const {
        std::cell::RefCell::new(DateCache { second: u64::MAX, text: [0; 29] })
    };
}

/// The `Date` value, formatted once a second per thread.
struct DateCache {
    second: u64,
    text: [u8; 29],
}

impl DateCache {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == self.text.len() {
                self.text.copy_from_slice(text.as_bytes());
                self.second = second;
            }
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::table::USUAL_ENDPOINTS;

    #[test]
    fn the_usual_paths_are_the_usual_endpoints_and_parse_as_themselves() {
        for (path, endpoint) in USUAL_PATHS.iter().zip(USUAL_ENDPOINTS) {
            assert_eq!(*path, format!("/v1/{endpoint}"));
            let uri = usual_uri(path).expect("a usual path");
            assert_eq!(uri, path.parse::<Uri>().unwrap());
            assert_eq!(uri.path(), *path);
            assert!(uri.query().is_none());
        }
        assert_eq!(USUAL_PATHS.len(), USUAL_ENDPOINTS.len());
        for other in [
            "/v1/chat/completions?x=1",
            "/v1/chat/completions/",
            "/v1/models",
        ] {
            assert!(usual_uri(other).is_none(), "{other}");
        }
    }
}
