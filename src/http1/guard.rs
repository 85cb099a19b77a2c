//! Watches HTTP/1 request framing on the wire, to refuse a request that has
//! both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper accepts such a request (chunked wins, the connection closes after
//! it) and removes `Content-Length` before the handler sees it, so the
//! conflict can only be seen here, in the bytes read from the socket. The
//! watcher follows each request's body framing to find the next head, and
//! records the number of the first conflicting head; the connection's
//! service answers that request with 400 and closes. It never changes a byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunked;
use super::framing::RequestBody;
use super::head::{head_end, MAX_HEAD};

/// Shared between the watcher and the connection's service.
#[derive(Debug, Default)]
pub struct FramingVerdict {
    /// Number (1-based) of the first request head with conflicting framing; 0 for none.
    conflicting_head: AtomicU64,
    /// Requests handed to the service so far.
    served: AtomicU64,
}

impl FramingVerdict {
    /// Called once per request, in order: true when this request is the
    /// one with conflicting framing.
    pub fn next_request_conflicts(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.conflicting_head.load(Ordering::Relaxed) == n
    }
}

#[derive(Debug, PartialEq)]
pub(crate) enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// Stopped following: HTTP/2, a CONNECT, an unparsable head, or a conflict seen.
    Off,
}

pub struct Watched<IO> {
    io: IO,
    state: State,
    buf: Vec<u8>,
    heads: u64,
    verdict: Arc<FramingVerdict>,
}

impl<IO> Watched<IO> {
    pub fn new(io: IO) -> (Self, Arc<FramingVerdict>) {
        let verdict = Arc::new(FramingVerdict::default());
        let w = Watched {
            io,
            state: State::Head,
            buf: Vec::new(),
            heads: 0,
            verdict: verdict.clone(),
        };
        (w, verdict)
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    if self.buf.is_empty() {
                        // Empty lines before a request line are skipped,
                        // as httparse skips them: they are no head.
                        let lead = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[lead..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    let start = self.buf.len().saturating_sub(2);
                    self.buf.extend_from_slice(bytes);
                    let Some(head_len) = head_end(&self.buf, start) else {
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let rest_from = bytes.len() - (self.buf.len() - head_len);
                    self.buf.truncate(head_len);
                    self.state = self.read_head();
                    self.buf.clear();
                    bytes = &bytes[rest_from..];
                }
                State::Fixed(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.state = if take == n {
                        State::Head
                    } else {
                        State::Fixed(n - take)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = memchr::memchr(b'\n', bytes) else {
                        self.buf.extend_from_slice(bytes);
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&bytes[..=nl]);
                    bytes = &bytes[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    self.state = match self.state {
                        State::ChunkSize => match chunked::parse_size(&line) {
                            Ok(Some((_, 0))) => State::Trailers,
                            Ok(Some((_, size))) => State::ChunkData(size),
                            _ => State::Off,
                        },
                        _ if line == b"\r\n" || line == b"\n" => State::Head,
                        _ => State::Trailers,
                    };
                }
                State::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.state = if take == n {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd(left) => {
                    let take = (left as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    self.state = if take == left as usize {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(left - take as u8)
                    };
                }
            }
        }
    }

    /// Reads the head in `buf` and returns how its body is framed.
    fn read_head(&mut self) -> State {
        let Some(facts) = HeadFacts::read(self.buf.trim_ascii_start()) else {
            return State::Off;
        };
        self.heads += 1;
        let (state, conflict) = facts.framing();
        if conflict {
            let _ = self.verdict.conflicting_head.compare_exchange(
                0,
                self.heads,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        state
    }
}

/// What a request head says about its body's framing.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HeadFacts<'a> {
    pub(crate) connect: bool,
    /// The first `Content-Length` value.
    pub(crate) first_length: Option<&'a [u8]>,
    /// The last `Transfer-Encoding` value.
    pub(crate) last_encoding: Option<&'a [u8]>,
}

impl<'a> HeadFacts<'a> {
    /// Reads a head (request line to empty line) line by line, as httparse
    /// splits a head it accepts: a line ends at `\n` (a `\r` before it
    /// dropped), a field's name runs to the first `:`, its value is
    /// trimmed. A head httparse refuses may read differently here, but
    /// hyper answers it with 400 and closes the connection, so nothing
    /// after it is followed. `None` for HTTP/2's preface or a field line
    /// without `:`: stop following. No second full parse per request.
    pub(crate) fn read(head: &'a [u8]) -> Option<HeadFacts<'a>> {
        if head.starts_with(b"PRI * HTTP/2.0") {
            return None;
        }
        let mut facts = HeadFacts::default();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', head) {
            let line = &head[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if start == 0 {
                facts.connect = line.starts_with(b"CONNECT ");
            } else if line.is_empty() {
                break;
            } else {
                let colon = memchr::memchr(b':', line)?;
                let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
                match name.len() {
                    14 if name.eq_ignore_ascii_case(b"content-length") => {
                        facts.first_length.get_or_insert(value);
                    }
                    17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                        facts.last_encoding = Some(value);
                    }
                    _ => {}
                }
            }
            start = end + 1;
        }
        Some(facts)
    }

    /// How the body is framed, and whether the head has both a length and
    /// a transfer coding (then nothing more is followed).
    pub(crate) fn framing(&self) -> (State, bool) {
        let body = RequestBody::of(self.first_length, self.last_encoding);
        if body == RequestBody::Conflict {
            return (State::Off, true);
        }
        // A CONNECT is answered 405 and its connection closed (see
        // `server`). An `Upgrade` is followed like any request: gptbalance
        // never answers 101, so hyper reads on after it as before it.
        if self.connect {
            return (State::Off, false);
        }
        let state = match body {
            RequestBody::Length(0) => State::Head,
            RequestBody::Length(n) => State::Fixed(n),
            RequestBody::Chunked => State::ChunkSize,
            // hyper answers these with 400 itself.
            RequestBody::Invalid | RequestBody::Conflict => State::Off,
        };
        (state, false)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if matches!(self.state, State::Off) {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        // Read straight into the caller's buffer and look at what arrived:
        // no copy. (hyper reads through `TokioIo` around this.)
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        self.feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(chunks: &[&[u8]]) -> (u64, u64) {
        let (mut w, v) = Watched::new(());
        for c in chunks {
            w.feed(c);
        }
        (w.heads, v.conflicting_head.load(Ordering::Relaxed))
    }

    #[test]
    fn follows_bodies_to_find_each_head() {
        let a: &[u8] = b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let b: &[u8] =
            b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let c: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let all = [a, b, c].concat();
        assert_eq!(heads(&[&all]), (3, 0));
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(heads(&bytes), (3, 0));
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_one() {
        let body = b"x\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let req = [
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
            body,
        ]
        .concat();
        assert_eq!(heads(&[&req]), (1, 0));
    }

    /// The facts as httparse reads them: `None` where it refuses the head.
    fn by_httparse(head: &[u8]) -> Option<HeadFacts<'_>> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return None;
        }
        let named = |n: &'static str| {
            req.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(n))
                .map(|h| h.value)
        };
        Some(HeadFacts {
            connect: req.method == Some("CONNECT"),
            first_length: named("content-length").next(),
            last_encoding: named("transfer-encoding").next_back(),
        })
    }

    /// Wherever httparse (hence hyper) accepts a head, the line reader
    /// finds the same framing and the same conflict: generated heads with
    /// lengths and codings in any case, spacing and order, look-alike
    /// names, and lines httparse refuses.
    #[test]
    fn head_reading_agrees_with_httparse() {
        let names = [
            "Content-Length",
            "content-length",
            "CONTENT-LENGTH",
            "Transfer-Encoding",
            "transfer-encoding",
            "Upgrade",
            "Host",
            "Content-Lengthx",
            "Transfer-Encodin",
            "X-Content-Length",
        ];
        let values = [
            "5",
            " 12 ",
            "0",
            "abc",
            "-1",
            "chunked",
            "gzip, chunked",
            "chunked, gzip",
            " Chunked ",
            "",
            "h2c",
            "1:2",
        ];
        let odd_lines = [
            "NoColon",
            " folded: x",
            "Bad Name: 1",
            "Host : x",
            "X: a\rb",
        ];
        let mut rng = fastrand::Rng::with_seed(41);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let method = ["GET", "POST", "CONNECT", "PUT"][rng.usize(..4)];
            let mut head = format!("{method} /v1/x HTTP/1.1\r\n");
            for _ in 0..rng.usize(..6) {
                if rng.u8(..20) == 0 {
                    head.push_str(odd_lines[rng.usize(..odd_lines.len())]);
                } else {
                    let sep = [": ", ":", ":  ", ":\t"][rng.usize(..4)];
                    head.push_str(names[rng.usize(..names.len())]);
                    head.push_str(sep);
                    head.push_str(values[rng.usize(..values.len())]);
                }
                head.push_str(if rng.u8(..10) == 0 { "\n" } else { "\r\n" });
            }
            head.push_str("\r\n");
            let Some(want) = by_httparse(head.as_bytes()) else {
                continue;
            };
            accepted += 1;
            let got = HeadFacts::read(head.as_bytes()).unwrap_or_else(|| panic!("{head:?}"));
            assert_eq!(got.framing(), want.framing(), "{head:?}");
        }
        assert!(accepted > 10_000, "httparse accepted {accepted}");
    }

    #[test]
    fn bare_lf_heads_empty_lines_and_upgrades_are_followed() {
        let lf: &[u8] = b"OPTIONS /healthz HTTP/1.1\nHost: x\n\n";
        let upgrade: &[u8] = b"GET /healthz HTTP/1.1\r\nUpgrade: foo\r\n\r\n";
        let bad: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let all = [lf, b"\r\n", upgrade, b"\r\n\r\n", bad].concat();
        assert_eq!(heads(&[&all]), (3, 3));
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(heads(&bytes), (3, 3));
        let mixed: &[u8] = b"GET / HTTP/1.1\r\nA: b\n\r\n";
        assert_eq!(heads(&[mixed, bad]), (2, 2));
    }

    #[test]
    fn marks_the_head_with_both_lengths() {
        let ok: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let bad: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(heads(&[ok, bad]), (2, 2));
    }
}
