//! The server side of a connection, from accept to close.
//!
//! `run` (here) takes a bound listener and a shutdown future, so tests bind
//! port 0 and know the address before the first request. It accepts under
//! `max_connections`, and spawns one task per connection holding a
//! [`Drain`]. A plain connection starts on the server's own HTTP/1.1 loop
//! (`h1_loop`), which serves the usual request and hands the connection,
//! with the bytes it read, to hyper (`handoff`, over `conn::HandedOff`,
//! which resets an aborted connection on close) when a request needs it;
//! with `server.tls`, a connection's TLS handshake (bounded by
//! `header_read_timeout`, `tls`) comes first and hyper serves it all.
//! hyper's connections close when idle past `keepalive_timeout` (`idle`).
//! On shutdown the accept loop stops, starts the drain (`drain`) and waits
//! for the connections under `shutdown_grace`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

// The HTTP/1 codec and the server loop against hyper and httparse.
mod conn;
#[cfg(test)]
mod differential;
mod drain;
pub mod h1_loop;
mod handoff;
mod idle;
pub mod tls;

use bytes::Bytes;
use conn::HandedOff;
pub use drain::{Drain, DrainSignal};
use handoff::serve_with_hyper;

use crate::state::AppState;
use crate::upstream;

/// Serves until `shutdown` resolves, then stops accepting and lets open
/// requests finish for up to `server.shutdown_grace` before cutting them.
/// Speaks TLS when the config has `server.tls` as `run` starts, for the
/// listener's whole life.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let server_cfg = state.table.load().config.server.clone();
    let tls = tls::acceptor(&state);
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
    // Every connection task holds a `Drain`: the signal asks it to finish
    // its request and close, and sees when the last one is gone.
    let (signal, drain) = DrainSignal::new();
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
        let drain = drain.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, peer, state, &builder, drain).await,
                Some(tls) => serve_tls(tls, stream, peer, state, &builder, drain).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(drain);
    signal.start();
    let grace = state.table.load().config.server.shutdown_grace;
    tracing::debug!(
        open_connections = signal.open_connections(),
        ?grace,
        "worker draining"
    );
    if tokio::time::timeout(grace, signal.all_closed())
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
    drain: Drain,
) {
    let io = match h1_loop::serve(stream, Some(peer), state.clone(), drain.clone()).await {
        h1_loop::Exit::Closed => return,
        h1_loop::Exit::HandOff(io) => io,
    };
    let aborted = io.abort_flag();
    serve_with_hyper(io, aborted, peer, state, builder, drain).await;
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
    mut drain: Drain,
) {
    let limit = state.table.load().config.server.header_read_timeout;
    let handshake = tokio::time::timeout(limit, tls.accept(stream));
    let io = tokio::select! {
        done = handshake => match done {
            Ok(Ok(io)) => HandedOff::new(Bytes::new(), io),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, ?limit, "TLS handshake not done within header_read_timeout");
                return;
            }
        },
        () = drain.started() => return,
    };
    let aborted = io.abort_flag();
    serve_with_hyper(io, aborted, peer, state, builder, drain).await;
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
