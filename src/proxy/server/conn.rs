//! A connection as hyper serves it, whichever way it came: handed over by
//! the server's HTTP/1.1 loop (with the bytes that loop read and did not
//! use, which hyper reads first) or from a TLS handshake. A response body
//! that fails marks it aborted, and an aborted connection is reset when it
//! closes, on every path alike.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Makes closing `io` reset the connection (`SO_LINGER` 0: an RST, not a
/// FIN): the way an aborted response is told from a complete one by a
/// caller that reads a body to the close (HTTP/1.0, or any caller that
/// does not check the framing). Bytes not yet sent are dropped.
pub(crate) fn reset_on_close(io: &TcpStream) {
    let _ = socket2::SockRef::from(io).set_linger(Some(Duration::ZERO));
}

/// A stream over one TCP socket, which an abort resets.
pub trait OverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OverTcp for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A connection hyper serves: `prefix` (bytes already read, if any) comes
/// before the rest of `io`.
pub struct HandedOff<IO: OverTcp> {
    prefix: Bytes,
    io: IO,
    /// Set when a response was aborted: closing resets the connection.
    aborted: Arc<AtomicBool>,
}

impl<IO: OverTcp> HandedOff<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        HandedOff {
            prefix,
            io,
            aborted: Arc::default(),
        }
    }

    /// The flag that, once set, makes dropping this connection reset it
    /// (see [`reset_on_close`]); hyper owns the connection until then.
    pub fn abort_flag(&self) -> Arc<AtomicBool> {
        self.aborted.clone()
    }
}

impl<IO: OverTcp> Drop for HandedOff<IO> {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::Relaxed) {
            reset_on_close(self.io.tcp());
        }
    }
}

impl<IO: OverTcp> AsyncRead for HandedOff<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: OverTcp> AsyncWrite for HandedOff<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
