//! The access log: one `info` line per request with who called, what, and
//! how it ended, the fields an nginx user greps (`logging.access`).
//!
//! `handler::handle`, given the connection's peer by the accept loop,
//! opens a [`Request`] scope (address, method, path, start) around the
//! request. A proxied request's `Completion` claims it and logs the line
//! when the request ends, after its last body byte, with client, model
//! and tokens; `within` logs every other request (health, models,
//! metrics, admin, refusals before routing) when its response is ready. `X-Forwarded-For` names the caller only when the
//! peer is in `server.trusted_proxies`: anyone can send the header.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::{Either, FutureExt};
use http::{HeaderMap, Method, Response, Uri};

use super::api_error::ApiError;
use super::body::ResponseBody;
use crate::config::IpNet;
use crate::state::AppState;

tokio::task_local! {
    static REQUEST: Arc<Request>;
}

/// One request as the access log sees it.
pub struct Request {
    /// The connection's peer.
    pub peer: Option<SocketAddr>,
    /// The caller: from `X-Forwarded-For` when the peer is a trusted
    /// proxy, else the peer's address.
    pub remote: Option<IpAddr>,
    pub method: Method,
    /// As received (a cheap clone of the request's).
    pub uri: Uri,
    pub started: Instant,
    /// Set by the `Completion` that will log this request.
    claimed: AtomicBool,
}

impl Request {
    /// The request's scope, or `None` when `logging.access` is off.
    pub fn begin<B>(
        state: &AppState,
        req: &http::Request<B>,
        peer: Option<SocketAddr>,
    ) -> Option<Arc<Request>> {
        Request::open(state, req.method(), req.uri(), req.headers(), peer)
    }

    fn open(
        state: &AppState,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Option<Arc<Request>> {
        // The line is logged at `info`: with that level off (a gateway
        // under load usually runs at `warn`), nothing is kept for it.
        if !tracing::enabled!(tracing::Level::INFO) {
            return None;
        }
        let table = state.table.load();
        if !table.config.logging.access {
            return None;
        }
        let remote =
            peer.map(|p| caller_address(p.ip(), &table.config.server.trusted_proxies, headers));
        Some(Arc::new(Request {
            peer,
            remote,
            method: method.clone(),
            uri: uri.clone(),
            started: Instant::now(),
            claimed: AtomicBool::new(false),
        }))
    }

    /// The path, for the log. Not the query: a caller may put a
    /// credential there, and no credential is ever logged.
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}

/// Runs `f` (the request's handling) inside `request`'s scope, then logs
/// the request if nothing on its way claimed it. The scope's future
/// itself, not an `async fn` around it: that would hold `f` twice (its
/// argument and the scope's copy), and the handler's future, which holds
/// this one, is moved per request.
pub fn within<F>(
    request: Option<Arc<Request>>,
    f: F,
) -> impl Future<Output = Result<Response<ResponseBody>, ApiError>>
where
    F: Future<Output = Result<Response<ResponseBody>, ApiError>>,
{
    match request {
        None => Either::Left(f),
        Some(request) => Either::Right(REQUEST.scope(request.clone(), f).map(move |answer| {
            if !request.claimed.load(Ordering::Relaxed) {
                log_unclaimed(&request, &answer);
            }
            answer
        })),
    }
}

/// The line of a request no `Completion` claimed.
fn log_unclaimed(r: &Request, answer: &Result<Response<ResponseBody>, ApiError>) {
    let status = match answer {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    };
    log_line(r, status);
}

/// The line of a request the fast path refused on its head (no valid
/// token), before any scope was opened.
pub fn log_refused(
    state: &AppState,
    head: (&Method, &Uri, &HeaderMap),
    peer: Option<SocketAddr>,
    status: http::StatusCode,
) {
    let (method, uri, headers) = head;
    if let Some(r) = Request::open(state, method, uri, headers, peer) {
        log_line(&r, status);
    }
}

fn log_line(r: &Request, status: http::StatusCode) {
    tracing::info!(
        remote_addr = r.remote.map(tracing::field::display),
        peer = r.peer.map(tracing::field::display),
        method = %r.method,
        path = %r.path(),
        status = status.as_u16(),
        latency_ms = r.started.elapsed().as_millis() as u64,
        "request"
    );
}

/// For a `Completion`: takes over logging the current request. `None`
/// outside a request scope (or with `logging.access` off).
pub fn claim() -> Option<Arc<Request>> {
    REQUEST
        .try_with(|r| {
            r.claimed.store(true, Ordering::Relaxed);
            r.clone()
        })
        .ok()
}

/// The caller's address: the peer's, unless the peer is a trusted proxy;
/// then the rightmost `X-Forwarded-For` entry that is not one (each proxy
/// appends the address it got the request from, so entries left of the
/// first untrusted one could be made up by the caller). A header that
/// does not parse leaves the peer's address.
pub fn caller_address(peer: IpAddr, trusted: &[IpNet], headers: &HeaderMap) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for entry in value.split(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    let mut caller = peer;
    for ip in hops.into_iter().rev() {
        caller = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    caller
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = [
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("::1").unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let chain = headers(&["198.51.100.9, 203.0.113.7", "10.1.2.3"]);
        // Untrusted peer: its own address, whatever it claims.
        assert_eq!(
            caller_address(ip("192.0.2.1"), &trusted, &chain),
            ip("192.0.2.1")
        );
        // Trusted peer: the rightmost untrusted hop.
        assert_eq!(
            caller_address(ip("10.0.0.2"), &trusted, &chain),
            ip("203.0.113.7")
        );
        assert_eq!(
            caller_address(ip("::1"), &trusted, &chain),
            ip("203.0.113.7")
        );
        // Only trusted hops: the leftmost of them.
        let inner = headers(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(
            caller_address(ip("10.0.0.2"), &trusted, &inner),
            ip("10.9.9.9")
        );
        // No header, or one that does not parse: the peer.
        assert_eq!(
            caller_address(ip("10.0.0.2"), &trusted, &headers(&[])),
            ip("10.0.0.2")
        );
        let junk = headers(&["203.0.113.7, unknown"]);
        assert_eq!(
            caller_address(ip("10.0.0.2"), &trusted, &junk),
            ip("10.0.0.2")
        );
        // An IPv4 peer on a dual-stack socket.
        assert_eq!(
            caller_address(ip("::ffff:10.0.0.2"), &trusted, &chain),
            ip("203.0.113.7")
        );
    }
}
