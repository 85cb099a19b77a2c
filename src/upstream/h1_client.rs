//! HTTP/1.1 to plain-HTTP upstreams, on the request's own task.
//!
//! hyper's client drives each connection as a task of its own and passes
//! the request, the response head and every body chunk between that task
//! and the caller's through channels: three task wake-ups and their
//! bookkeeping per request, about a fifth of gptbalance's CPU per request.
//! A gateway sends one request at a time on a connection, so none of that
//! is needed: here the request's task writes the request head and body and
//! reads the response head itself, and the response body is read from the
//! socket as the caller reads it. TLS and HTTP/2 upstreams stay on hyper.
//!
//! What is read follows RFC 9112: a `Content-Length` body, a chunked one
//! (extensions and trailers skipped), or one that ends when the upstream
//! closes; interim (1xx) responses are skipped, also one that comes while
//! the request body is still being written. Refused as invalid: heads
//! over 64 KiB, conflicting lengths, transfer codings other than chunked.
//! A connection is offered for reuse only after a complete response with
//! nothing left over, and not when the response asked to close it; it is
//! checked again, on the socket, right before it is reused.
//!
//! Headers gptbalance reads go into the response's header map; the others
//! stay lines of the head ([`RelayedHeaders`]). Both go through the one
//! relay policy in `upstream.rs`, as a TLS upstream's headers do.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, StatusCode, Version};

use super::request::Outgoing;
use crate::http1::chunked;
use crate::http1::framing::{push_decimal, Connection, ContentLength};
use crate::http1::head::{push_field, RelayedHeaders, Span, MAX_HEAD, MAX_HEADERS};
use crate::http1::{framing, names};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

/// Why an answer with a transfer coding other than chunked is refused.
pub(crate) const FOREIGN_CODING: &str = "a transfer coding other than chunked";

/// Read buffer room asked for before each read.
const READ_ROOM: usize = 8 * 1024;
/// Request bodies up to this size go out in the same write as the head.
const COALESCE_BODY: usize = 64 * 1024;

/// Why a plain-HTTP exchange failed. Carries no address or header: these
/// messages reach callers.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("tcp connect error: {0}")]
    Connect(#[source] io::Error),
    #[error("tcp connect error: no address for the upstream host")]
    NoAddress,
    #[error("tcp connect error: timed out")]
    ConnectTimeout,
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before the response was complete")]
    Incomplete,
    #[error("invalid HTTP response from the upstream: {0}")]
    Invalid(&'static str),
}

/// How much of a request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Whole,
    /// The upstream answered before it had taken the whole request.
    Cut,
}

/// One open connection and the bytes read from it but not yet used.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Resolves and connects, trying each address in turn; `timeout` covers
    /// the whole, shared evenly among the addresses left.
    pub async fn connect(authority: &Authority, timeout: Duration) -> Result<Conn, WireError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = authority.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> =
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Err(_) => return Err(WireError::ConnectTimeout),
                Ok(Err(e)) => return Err(WireError::Connect(e)),
                Ok(Ok(a)) => a.collect(),
            };
        let mut last = WireError::NoAddress;
        for (i, addr) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / (addrs.len() - i) as u32;
            match tokio::time::timeout(share, open(*addr)).await {
                Ok(Ok(io)) => {
                    return Ok(Conn {
                        io,
                        buf: BytesMut::new(),
                    })
                }
                Ok(Err(e)) => last = WireError::Connect(e),
                Err(_) => last = WireError::ConnectTimeout,
            }
        }
        Err(last)
    }

    /// Whether an idle connection can take a request: the upstream has not
    /// closed it or sent anything unasked (such bytes would be read as the
    /// next request's answer). Asked of the socket itself, right before
    /// each reuse: tokio's readiness flag lags bytes that came since its
    /// driver last turned, on a busy thread for a while. One `recv`
    /// (`MSG_PEEK`) per reuse.
    pub fn is_reusable(&mut self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        self.buf.is_empty()
            && matches!(
                socket2::SockRef::from(&self.io).peek(&mut probe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            )
    }

    /// Writes the request: `Ok(Written::Whole)`, or `Ok(Written::Cut)`
    /// when the upstream began to answer before taking all of it (a 413 or
    /// 401 for a large body): that answer is then read as the response, and
    /// the connection is not reused. On error, whether any byte left is
    /// unknown to the caller; a request is sent again only when this fails
    /// on a reused connection, which the upstream had closed.
    pub async fn write_request(
        &mut self,
        req: &Outgoing<'_>,
        host: Option<&HeaderValue>,
    ) -> io::Result<Written> {
        let body = &req.body;
        let mut out =
            Vec::with_capacity(256 + req.header_count_hint() * 48 + body.len().min(COALESCE_BODY));
        encode_head(req, host, &mut out);
        if body.len() <= COALESCE_BODY {
            out.extend_from_slice(body);
            self.write_watching(&out).await
        } else {
            match self.write_watching(&out).await? {
                Written::Whole => self.write_watching(body).await,
                cut => Ok(cut),
            }
        }
    }

    /// Writes `bytes` while watching for an answer: a request the upstream
    /// stops reading (it has answered) must not wait for buffer space that
    /// never comes. A small request goes out in the first write.
    async fn write_watching(&mut self, mut bytes: &[u8]) -> io::Result<Written> {
        loop {
            match self.io.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if bytes.is_empty() {
                return Ok(Written::Whole);
            }
            let ready = self
                .io
                .ready(Interest::READABLE | Interest::WRITABLE)
                .await?;
            if ready.is_readable() {
                if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
                    self.buf.reserve(READ_ROOM);
                }
                match self.io.try_read_buf(&mut self.buf) {
                    Ok(0) => return Err(io::ErrorKind::BrokenPipe.into()),
                    Ok(_) => {
                        if self.early_answer_begun() {
                            return Ok(Written::Cut);
                        }
                    }
                    // A readiness flag left from an earlier read.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Whether what the upstream has sent while the request was still
    /// being written begins a final answer. Interim (1xx) heads are not
    /// one (RFC 9110 15.2): an unasked `100 Continue` is dropped and the
    /// writing goes on. Undecided while less than a status line has come.
    fn early_answer_begun(&mut self) -> bool {
        loop {
            let Some(code) = status_code(&self.buf) else {
                // Not a status line: the answer is read (and refused) as one.
                return self.buf.len() >= 12
                    || !b"HTTP/1.".starts_with(&self.buf[..self.buf.len().min(7)]);
            };
            if !(100..200).contains(&code) || code == 101 {
                return true;
            }
            match parse_head(&mut self.buf) {
                Ok(Some(_)) => continue,
                Ok(None) => return self.buf.len() >= MAX_HEAD,
                Err(_) => return true,
            }
        }
    }

    /// Reads up to the end of the response head (skipping interim
    /// responses) and works out how the body is framed.
    pub async fn read_head(
        mut self,
        method: &Method,
    ) -> Result<(Response<()>, PlainBody), WireError> {
        loop {
            let head = loop {
                if !self.buf.is_empty() {
                    if let Some(head) = parse_head(&mut self.buf)? {
                        break head;
                    }
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(WireError::Invalid("response head too large"));
                }
                if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                    return Err(WireError::Incomplete);
                }
            };
            let status = head.status();
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError::Invalid("unexpected 101 Switching Protocols"));
            }
            if status.is_informational() {
                continue;
            }
            let (framing, keep_alive) = framing_of(&head, method)?;
            let mut head = head;
            if head.headers().contains_key(header::TRANSFER_ENCODING) {
                // The length of the decoded body is not this.
                head.headers_mut().remove(header::CONTENT_LENGTH);
            }
            let body = PlainBody::new(self, framing, keep_alive);
            return Ok((head, body));
        }
    }

    /// Reads once into the buffer; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
            self.buf.reserve(READ_ROOM);
        }
        // tokio's `poll_read` (unlike `try_read`) clears the readiness flag
        // after a short read, so a connection that has sent everything is
        // not woken again for nothing.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

async fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_keepalive(true)?;
    let io = socket.connect(addr).await?;
    io.set_nodelay(true)?;
    keepalive_after(&io, 60);
    Ok(io)
}

/// The idle time before the first keepalive probe (the default is hours);
/// a failure only leaves the system default.
fn keepalive_after(io: &TcpStream, secs: u64) {
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(secs));
    let _ = socket2::SockRef::from(io).set_tcp_keepalive(&keepalive);
}

/// The request line, `Host`, the request's headers and `Content-Length`.
/// `host` is used unless the request carries its own `Host`.
pub fn encode_head(req: &Outgoing<'_>, host: Option<&HeaderValue>, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let (Some(host), false) = (host, req.has_host()) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    req.for_each_header(|name, value| {
        // Framing is this module's to write.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            return;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    });
    let len = req.body.len();
    let has_body_semantics = !matches!(
        req.method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    );
    if len > 0 || has_body_semantics {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, len as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The status code of the status line at the start of `buf`, once its
/// first twelve bytes are there and read as one.
fn status_code(buf: &[u8]) -> Option<u16> {
    let line = buf.get(..12)?;
    if !line.starts_with(b"HTTP/1.") || line[8] != b' ' || !line[9..].iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    Some(
        line[9..]
            .iter()
            .fold(0, |n, d| n * 10 + u16::from(d - b'0')),
    )
}

/// A complete response head off the front of `buf`, or `None` when more
/// bytes are needed. Header values share the head's bytes.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Response<()>>, WireError> {
    let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Invalid("too many headers"))
            }
            Err(_) => return Err(WireError::Invalid("malformed response head")),
        };
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            // Offsets into `buf`, which is a small multiple of MAX_HEAD
            // at most here: far inside u32.
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            *span = (
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    if len > MAX_HEAD {
        // However much of it was read at once.
        return Err(WireError::Invalid("response head too large"));
    }
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| WireError::Invalid("bad status code"))?;
    // The headers gptbalance reads or replaces go into the map, with room
    // for the few it adds (x-request-id); the rest (most of a real
    // upstream's: `x-ratelimit-*`, `openai-*`, `cf-ray`) are only
    // relayed, and stay lines of the head.
    let mut headers = HeaderMap::with_capacity(count.min(8) + 3);
    let mut relayed = Vec::new();
    for &span in &spans[..count] {
        let (ns, ne, vs, ve) = span;
        let name = &head[ns as usize..ne as usize];
        let name = match names::known(name) {
            Some(name) => Some(name),
            None if read_by_router(name) => HeaderName::from_bytes(name).ok(),
            None => None,
        };
        match name {
            Some(name) => {
                if let Some(value) = names::value(head.slice(vs as usize..ve as usize)) {
                    headers.append(name, value);
                }
            }
            None => relayed.push(span),
        }
    }
    let mut resp = Response::new(());
    if !relayed.is_empty() {
        resp.extensions_mut()
            .insert(RelayedHeaders::new(head.clone(), relayed));
    }
    *resp.status_mut() = status;
    *resp.version_mut() = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *resp.headers_mut() = headers;
    Ok(Some(resp))
}

/// Whether the router reads this (not common) response header, so it goes
/// into the map as on the TLS backend: the quota headers
/// (`x-ratelimit-*`). Others are read through
/// [`super::response_header`].
fn read_by_router(name: &[u8]) -> bool {
    name.len() > 12 && name[..12].eq_ignore_ascii_case(b"x-ratelimit-")
}

/// How the body is delimited, and whether the connection may be reused.
/// One pass over the headers: standard names compare without hashing.
fn framing_of(head: &Response<()>, method: &Method) -> Result<(Framing, bool), WireError> {
    let http10 = head.version() == Version::HTTP_10;
    let mut connection = Connection::default();
    let mut last_coding: Option<&[u8]> = None;
    let mut foreign_coding = false;
    let mut length = ContentLength::default();
    for (name, value) in head.headers() {
        let value = value.as_bytes();
        if name == header::CONNECTION {
            connection.add(value);
        } else if name == header::TRANSFER_ENCODING {
            last_coding = Some(value);
            foreign_coding |= framing::foreign_coding(value);
        } else if name == header::CONTENT_LENGTH {
            length.add(value);
        }
    }
    let keep_alive = connection.persists(http10);
    let status = head.status();
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Done, keep_alive));
    }
    if foreign_coding {
        return Err(WireError::Invalid(FOREIGN_CODING));
    }
    if let Some(coding) = last_coding {
        // Chunked only when it is the last coding; otherwise the body runs
        // to the close. Transfer-Encoding overrides any Content-Length, but
        // a response with both (or chunked over HTTP/1.0) is suspect
        // framing: the connection is not reused after it (RFC 9112 6.1, 6.3).
        if framing::chunked_last(coding) {
            let trusted = keep_alive && !http10 && !length.is_present();
            return Ok((Framing::Chunked(Chunk::Size), trusted));
        }
        return Ok((Framing::ToClose, false));
    }
    Ok(match length.get().map_err(WireError::Invalid)? {
        Some(0) => (Framing::Done, keep_alive),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::ToClose, false),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many body bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    ToClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers { read: usize },
}

/// The response body read straight from the connection. At its end, a
/// connection that can be reused is kept for [`PlainBody::take_reusable`].
pub struct PlainBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    /// An error found right after data: reported on the next poll, so the
    /// data goes out first.
    error: Option<WireError>,
}

impl PlainBody {
    fn new(conn: Conn, framing: Framing, keep_alive: bool) -> PlainBody {
        let mut body = PlainBody {
            conn: Some(conn),
            framing,
            keep_alive,
            error: None,
        };
        if body.framing == Framing::Done {
            body.finish();
        }
        body
    }

    pub fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done && self.error.is_none()
    }

    /// Exact remaining length, where known.
    pub fn exact_len(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// The connection, once the body has been read to its end and the
    /// connection can take another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if self.framing == Framing::Done {
            self.conn.take()
        } else {
            None
        }
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if !(self.keep_alive && self.conn.as_ref().is_some_and(|c| c.buf.is_empty())) {
            self.conn = None;
        }
    }

    fn fail(&mut self, e: WireError) -> Poll<Option<Result<Bytes, WireError>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e)))
    }

    /// The next piece of body, `None` at its end.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        if let Some(e) = self.error.take() {
            return self.fail(e);
        }
        loop {
            if self.framing == Framing::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match step(&mut self.framing, &mut conn.buf) {
                Err(e) => return self.fail(e),
                Ok(Some(data)) => {
                    // Consume any framing already here (a chunk's CRLF, the
                    // last chunk, trailers), so that the end is known as
                    // soon as the last byte is handed on.
                    if let Err(e) = step_framing_only(&mut self.framing, &mut conn.buf) {
                        self.conn = None;
                        self.error = Some(e);
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if self.framing == Framing::Done {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(None) if self.framing == Framing::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if self.framing == Framing::ToClose => {
                    self.conn = None;
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return self.fail(WireError::Incomplete),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(e.into()),
            }
        }
    }
}

/// Advances over the buffered bytes: `Ok(Some)` is body data, `Ok(None)`
/// means the buffer holds nothing more to use (or the body is done).
fn step(framing: &mut Framing, buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
    loop {
        match *framing {
            Framing::Done => return Ok(None),
            Framing::ToClose => {
                return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
            }
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = left.min(buf.len() as u64);
                *framing = if n == left {
                    Framing::Done
                } else {
                    Framing::Length(left - n)
                };
                return Ok(Some(buf.split_to(n as usize).freeze()));
            }
            Framing::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = left.min(buf.len() as u64);
                *framing = Framing::Chunked(if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
                return Ok(Some(buf.split_to(n as usize).freeze()));
            }
            Framing::Chunked(_) => {
                if !chunk_framing(framing, buf)? {
                    return Ok(None);
                }
            }
        }
    }
}

/// Consumes whatever chunk framing is buffered, stopping before data.
fn step_framing_only(framing: &mut Framing, buf: &mut BytesMut) -> Result<(), WireError> {
    while matches!(*framing, Framing::Chunked(c) if !matches!(c, Chunk::Data(_))) {
        if !chunk_framing(framing, buf)? {
            break;
        }
    }
    Ok(())
}

/// One step of chunk framing (size line, data CRLF, trailer line) from
/// `buf`; false when more bytes are needed.
fn chunk_framing(framing: &mut Framing, buf: &mut BytesMut) -> Result<bool, WireError> {
    let Framing::Chunked(state) = *framing else {
        return Ok(false);
    };
    match state {
        Chunk::Data(_) => Ok(false),
        Chunk::Size => {
            let (line, size) = match chunked::parse_size(buf) {
                Ok(Some(line)) => line,
                Ok(None) if buf.len() > chunked::MAX_LINE => {
                    return Err(WireError::Invalid("chunk size line too long"))
                }
                Ok(None) => return Ok(false),
                Err(chunked::BadSize(why)) => return Err(WireError::Invalid(why)),
            };
            buf.advance(line);
            *framing = Framing::Chunked(if size == 0 {
                Chunk::Trailers { read: 0 }
            } else {
                Chunk::Data(size)
            });
            Ok(true)
        }
        Chunk::DataEnd => {
            // CRLF only, as hyper reads it: a parser more lenient than the
            // upstream's own framing is how responses get desynchronised.
            match buf.get(..2) {
                None if buf.first().is_none_or(|&b| b == b'\r') => return Ok(false),
                Some(b"\r\n") => {}
                _ => return Err(WireError::Invalid("chunk data longer than its size")),
            }
            buf.advance(2);
            *framing = Framing::Chunked(Chunk::Size);
            Ok(true)
        }
        Chunk::Trailers { read } => {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                if read + buf.len() > MAX_HEAD {
                    return Err(WireError::Invalid("trailers too large"));
                }
                return Ok(false);
            };
            if end == 0 || buf[end - 1] != b'\r' {
                return Err(WireError::Invalid("trailer line without CRLF"));
            }
            let blank = end == 1;
            buf.advance(end + 1);
            *framing = if blank {
                Framing::Done
            } else {
                Framing::Chunked(Chunk::Trailers {
                    read: read + end + 1,
                })
            };
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Feeds `wire` to the body decoder `split` bytes at a time (as reads
    /// would deliver it) and returns the body, or the first error.
    fn decode(
        framing: Framing,
        wire: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, bool, usize), WireError> {
        let mut framing = framing;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            while let Some(data) = step(&mut framing, &mut buf)? {
                assert!(!data.is_empty());
                body.extend_from_slice(&data);
                step_framing_only(&mut framing, &mut buf)?;
            }
            if framing == Framing::Done || fed == wire.len() {
                return Ok((body, framing == Framing::Done, buf.len()));
            }
            let n = split.min(wire.len() - fed);
            buf.extend_from_slice(&wire[fed..fed + n]);
            fed += n;
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_split() {
        let wire = b"5;ext=\"a;b\"\r\nhello\r\n1A\r\n abcdefghijklmnopqrstuvwxy\r\n0003 \t;x\r\n!!!\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n";
        let want = b"hello abcdefghijklmnopqrstuvwxy!!!".to_vec();
        for split in 1..=wire.len() {
            let (body, done, left) = decode(Framing::Chunked(Chunk::Size), wire, split).unwrap();
            assert_eq!(
                (body.as_slice(), done, left),
                (want.as_slice(), true, 0),
                "split {split}"
            );
        }
        // Line ends are CRLF, as the upstream's own framing reads them.
        for lenient in [
            &b"2\nhi\r\n0\r\n\r\n"[..],
            b"2\r\nhi\n0\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nx: 1\n\r\n",
            b"2;a\rb\r\nhi\r\n0\r\n\r\n",
        ] {
            let got = decode(Framing::Chunked(Chunk::Size), lenient, 64);
            assert!(
                matches!(got, Err(WireError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(lenient)
            );
        }
        // Bytes after the last chunk stay in the buffer (the connection is
        // then not reused).
        let (_, done, left) = decode(Framing::Chunked(Chunk::Size), b"0\r\n\r\nHTTP", 64).unwrap();
        assert_eq!((done, left), (true, 4));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\nhi\r\n0\r\n\r\n"[..],
            b"2\r\nhiX\r\n0\r\n\r\n",
            b"2 x\r\nhi\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"\r\n",
        ] {
            let got = decode(Framing::Chunked(Chunk::Size), wire, 3);
            assert!(
                matches!(got, Err(WireError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; chunked::MAX_LINE + 10];
        assert!(matches!(
            decode(Framing::Chunked(Chunk::Size), &long, 4096),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn sized_bodies_stop_at_their_length() {
        for split in 1..12 {
            let (body, done, left) =
                decode(Framing::Length(10), b"0123456789EXTRA", split).unwrap();
            assert_eq!((body.as_slice(), done), (&b"0123456789"[..], true));
            assert!(left <= 5);
        }
    }

    fn head(text: &str) -> Result<Option<Response<()>>, WireError> {
        parse_head(&mut BytesMut::from(text.as_bytes()))
    }

    #[test]
    fn response_heads_and_their_framing() {
        let r = head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 7\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        // The quota headers the router reads are in the map, as over TLS.
        let quota =
            head("HTTP/1.1 200 OK\r\nX-RateLimit-Remaining-Requests: 7\r\nx-other: 1\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(quota.headers()["x-ratelimit-remaining-requests"], "7");
        assert!(!quota.headers().contains_key("x-other"));
        let (parts, ()) = quota.into_parts();
        let read = |name| {
            crate::upstream::response_header(&parts, name)
                .map(|v| v.to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(read("x-ratelimit-remaining-requests"), [b"7".to_vec()]);
        assert_eq!(read("x-other"), [b"1".to_vec()]);
        assert!(read("x-missing").is_empty());
        // Headers gptbalance only relays stay lines of the head.
        assert!(!r.headers().contains_key("x-a"));
        let relayed: Vec<_> = r
            .extensions()
            .get::<RelayedHeaders>()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(relayed, [(&b"X-A"[..], &b"1"[..]), (b"x-a", b"2")]);
        let (mut parts, ()) = r.clone().into_parts();
        RelayedHeaders::merge(&mut parts.extensions, &mut parts.headers);
        assert_eq!(
            parts.headers.get_all("x-a").iter().collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(parts.extensions.get::<RelayedHeaders>().is_none());
        assert_eq!(
            framing_of(&r, &Method::POST).unwrap(),
            (Framing::Length(7), true)
        );
        assert_eq!(
            framing_of(&r, &Method::HEAD).unwrap(),
            (Framing::Done, true)
        );
        assert!(head("HTTP/1.1 200 OK\r\nContent-Type: app")
            .unwrap()
            .is_none());

        let framing = |text: &str| framing_of(&head(text).unwrap().unwrap(), &Method::POST);
        // Chunked alone keeps the connection; with a length, or over
        // HTTP/1.0, the framing is suspect and the connection is closed.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap(),
            (Framing::Chunked(Chunk::Size), true)
        );
        assert_eq!(
            framing(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .unwrap(),
            (Framing::Chunked(Chunk::Size), false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
                .unwrap(),
            (Framing::Chunked(Chunk::Size), false)
        );
        // A coding gptbalance would strip and not decode: refused.
        for coding in ["gzip", "gzip, chunked"] {
            let text = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert!(
                matches!(framing(&text), Err(WireError::Invalid(_))),
                "{coding}"
            );
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n").unwrap(),
            (Framing::ToClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            (Framing::Done, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n").unwrap(),
            (Framing::Done, false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n").unwrap(),
            (Framing::Length(2), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n")
                .unwrap(),
            (Framing::Length(2), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n").unwrap(),
            (Framing::Length(5), true)
        );
        for bad in [
            "Content-Length: 5, 6",
            "Content-Length: -1",
            "Content-Length: 99999999999999999999",
            "Content-Length: 0x10",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert!(
                matches!(framing(&text), Err(WireError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            head("SSH-2.0-OpenSSH_9.2\r\n\r\n"),
            Err(WireError::Invalid(_))
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(matches!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn request_heads_carry_host_headers_and_length() {
        let mut req = http::Request::post("http://up.example:8080/v1/chat/completions?x=1")
            .header("content-type", "application/json")
            .header("content-length", "999")
            .header("x-two", "a")
            .body(Bytes::from_static(b"{\"a\":1}"))
            .unwrap();
        req.headers_mut()
            .append("x-two", HeaderValue::from_static("b"));
        let host = HeaderValue::from_static("up.example:8080");
        let mut out = Vec::new();
        encode_head(&req.into(), Some(&host), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example:8080\r\ncontent-type: application/json\r\n\
             x-two: a\r\nx-two: b\r\ncontent-length: 7\r\n\r\n"
        );
        let get = http::Request::get("http://up/v1/models")
            .header("host", "override")
            .body(Bytes::new())
            .unwrap();
        let mut out = Vec::new();
        encode_head(&get.into(), Some(&host), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v1/models HTTP/1.1\r\nhost: override\r\n\r\n"
        );
    }

    /// An upstream on loopback that, for each accepted connection, reads a
    /// request head (and a body of `Content-Length`) and writes the next
    /// scripted answer; `None` closes the connection instead.
    async fn scripted(
        answers: Vec<Option<&'static [u8]>>,
    ) -> (Authority, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            for answer in answers {
                let Some(answer) = answer else { break };
                let end = loop {
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    let mut chunk = [0u8; 1024];
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                };
                let text = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < end + len {
                    let mut chunk = [0u8; 1024];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                seen.push(buf.drain(..end + len).collect());
                s.write_all(answer).await.unwrap();
            }
            seen
        });
        (authority, task)
    }

    async fn exchange(
        conn: Conn,
        body: &'static [u8],
    ) -> Result<(Response<()>, Vec<u8>, Option<Conn>), WireError> {
        let mut conn = conn;
        let req = http::Request::post("http://up/v1/x")
            .body(Bytes::from_static(body))
            .unwrap();
        conn.write_request(&req.into(), Some(&HeaderValue::from_static("up")))
            .await?;
        let (head, mut body) = conn.read_head(&Method::POST).await?;
        let mut got = Vec::new();
        while let Some(data) = std::future::poll_fn(|cx| body.poll_data(cx)).await {
            got.extend_from_slice(&data?);
        }
        Ok((head, got, body.take_reusable()))
    }

    #[tokio::test]
    async fn one_connection_carries_requests_until_the_upstream_closes_it() {
        let (authority, server) = scripted(vec![
            Some(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"),
            Some(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"),
            Some(b"HTTP/1.1 429 Too Many\r\nconnection: close\r\ncontent-length: 4\r\n\r\nslow"),
        ])
        .await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        let (head, body, conn) = exchange(conn, b"{\"n\":1}").await.unwrap();
        assert_eq!(
            (head.status().as_u16(), body.as_slice()),
            (200, &b"first"[..])
        );
        let mut conn = conn.expect("a complete response leaves the connection reusable");
        assert!(conn.is_reusable());
        let (_, body, conn) = exchange(conn, b"").await.unwrap();
        assert_eq!(body, b"second");
        let (head, body, conn) = exchange(conn.unwrap(), b"x").await.unwrap();
        assert_eq!(
            (head.status().as_u16(), body.as_slice()),
            (429, &b"slow"[..])
        );
        assert!(conn.is_none(), "connection: close is honoured");
        let seen = server.await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&seen[0]),
            "POST /v1/x HTTP/1.1\r\nhost: up\r\ncontent-length: 7\r\n\r\n{\"n\":1}"
        );
        assert!(String::from_utf8_lossy(&seen[1]).ends_with("content-length: 0\r\n\r\n"));
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_reused() {
        let (authority, server) = scripted(vec![
            Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            None,
        ])
        .await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        let (_, _, conn) = exchange(conn, b"").await.unwrap();
        let mut conn = conn.unwrap();
        server.await.unwrap();
        // The upstream's close reaches this side's socket shortly after.
        let mut closed = false;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if !conn.is_reusable() {
                closed = true;
                break;
            }
        }
        assert!(closed);
    }

    /// Bytes that came on an idle connection since this thread's runtime
    /// last looked at its sockets make it unusable: the check asks the
    /// socket, not tokio's readiness flag (which a busy thread updates
    /// late). The thread is blocked here while the bytes arrive, as a
    /// busy one would be.
    #[tokio::test]
    async fn stray_bytes_on_an_idle_connection_are_seen_right_before_reuse() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (stray_tx, stray_rx) = std::sync::mpsc::channel::<()>();
        let upstream = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            stray_rx.recv().unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
                .unwrap();
            // Held open until the test is done with it.
            let _ = stray_rx.recv();
        });
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        let (_, body, conn) = exchange(conn, b"").await.unwrap();
        assert_eq!(body, b"ok");
        let mut conn = conn.expect("a complete response");
        assert!(conn.is_reusable());
        stray_tx.send(()).unwrap();
        // Blocking: the runtime cannot turn its I/O driver meanwhile.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!conn.is_reusable(), "stray bytes are there");
        drop(stray_tx);
        upstream.join().unwrap();
    }

    #[tokio::test]
    async fn short_and_overlong_answers_are_errors_and_never_reused() {
        let (authority, _server) = scripted(vec![
            Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"),
            None,
        ])
        .await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(
            exchange(conn, b"").await,
            Err(WireError::Incomplete)
        ));

        let (authority, _server) = scripted(vec![Some(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        )])
        .await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        let (_, body, conn) = exchange(conn, b"").await.unwrap();
        assert_eq!(body, b"ok");
        assert!(conn.is_none(), "bytes after the response: not reused");

        let (authority, _server) = scripted(vec![None]).await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(
            exchange(conn, b"").await,
            Err(WireError::Incomplete | WireError::Io(_))
        ));

        let huge: &'static [u8] = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "v".repeat(MAX_HEAD))
                .into_bytes()
                .into_boxed_slice(),
        );
        let (authority, _server) = scripted(vec![Some(huge)]).await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(
            exchange(conn, b"").await,
            Err(WireError::Invalid("response head too large"))
        ));
    }

    #[tokio::test]
    async fn a_body_that_runs_to_the_close_ends_there() {
        let (authority, _server) =
            scripted(vec![Some(b"HTTP/1.1 200 OK\r\n\r\nall of it"), None]).await;
        let conn = Conn::connect(&authority, Duration::from_secs(5))
            .await
            .unwrap();
        let (_, body, conn) = exchange(conn, b"").await.unwrap();
        assert_eq!(body, b"all of it");
        assert!(conn.is_none());
    }

    #[tokio::test]
    async fn connect_errors_name_no_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let Err(e) = Conn::connect(&authority, Duration::from_secs(5)).await else {
            panic!("nothing listens there");
        };
        let text = e.to_string();
        assert!(text.starts_with("tcp connect error"), "{text}");
        assert!(!text.contains("127.0.0.1"), "{text}");
    }
}
