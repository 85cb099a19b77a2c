//! The pooled upstream client and the upstream request builder.
//!
//! One hyper-util client (HTTP/1.1 and HTTP/2 over rustls) per distinct
//! `connect_timeout` and worker thread, kept across reloads so pooled
//! connections survive them.
//! Redirects are never followed: a key is sent only to its `base_url`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::routing::{ClientRoute, KeyRoute};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Pooled upstream clients, one per distinct `connect_timeout` and per
/// thread: with a runtime per core, each worker drives its own upstream
/// connections, so a request never hops threads. Kept across reloads, so
/// pooled connections survive them.
#[derive(Default)]
pub struct UpstreamClients;

thread_local! {
    static POOLS: RefCell<HashMap<Duration, HttpClient>> = RefCell::new(HashMap::new());
}

impl UpstreamClients {
    /// This thread's pooled client for this connect timeout (a cheap handle clone).
    pub fn get(&self, connect_timeout: Duration) -> HttpClient {
        POOLS.with(|pools| {
            pools
                .borrow_mut()
                .entry(connect_timeout)
                .or_insert_with(|| build_client(connect_timeout))
                .clone()
        })
    }
}

fn build_client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .expect("the ring provider supports the default TLS versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https)
}

/// Caller headers never sent upstream: hop-by-hop headers, the caller's own
/// credentials, and those gptbalance sets itself.
const NOT_FORWARDED: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
    "http2-settings",
];

/// The caller's headers minus those never forwarded (and any the caller's
/// `Connection` header names), with room for `extra` more.
fn forwardable_headers(caller: &HeaderMap, extra: usize) -> HeaderMap {
    let named_by_connection: Vec<String> = caller
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(caller.len() + extra);
    for (name, value) in caller {
        let n = name.as_str();
        if NOT_FORWARDED.contains(&n) || named_by_connection.iter().any(|c| c == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Response headers not relayed to the caller (hop-by-hop, and the length
/// when gptbalance may change the body).
pub fn relayable_response_headers(upstream: &HeaderMap, keep_length: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 1);
    for (name, value) in upstream {
        match name.as_str() {
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te"
            | "trailer" | "upgrade" => {}
            "content-length" if !keep_length => {}
            _ => {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out
}

/// Builds one attempt's request to `client` with `key`; `caller_headers`
/// are filtered as they are copied (one header map per attempt).
pub fn build_request(
    client: &ClientRoute,
    key: &KeyRoute,
    method: &Method,
    endpoint: &str,
    query: Option<&str>,
    caller_headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut url = String::with_capacity(client.cfg.base_url.len() + endpoint.len() + 2);
    url.push_str(&client.cfg.base_url);
    url.push('/');
    url.push_str(endpoint);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    let uri: Uri = url.parse()?;
    let mut req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Full::new(body))?;
    let h = req.headers_mut();
    *h = forwardable_headers(caller_headers, 3 + client.cfg.headers.len());
    h.insert(header::AUTHORIZATION, key.authorization.clone());
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if !h.contains_key(header::CONTENT_TYPE) && method == Method::POST {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    for (name, value) in &client.cfg.headers {
        h.insert::<HeaderName>(name.clone(), value.clone());
    }
    Ok(req)
}
