//! One request: path, auth, body limit, `model`, request id; then the
//! attempts across keys, clients and fallbacks.
//!
//! Builds no error bodies itself (that is `api_error.rs`) and sends nothing
//! upstream itself (that is `attempt.rs` through `upstream.rs`).

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use smallvec::{smallvec, SmallVec};

use super::access;
use super::anthropic;
use super::api_error::{ApiError, X_REQUEST_ID};
use super::attempt::{self, Outcome, UpstreamError};
use super::body::{BoxError, ResponseBody};
use super::cors;
use super::endpoints;
use super::expect;
use super::multipart;
use super::ratelimit::RateLimitHeaders;
use super::relay::{Filter, JsonSniffer, PrefixBuffer, Relay};
use super::report::{Admission, Completion, SharedAdmission};
use super::route::{route, Route};
use super::shadow;
use super::sse::{PrefixSlot, SseFilter};
use super::transform::{self, Changes, EndpointKind, RequestBody};
use crate::config::prices::{self, Tokens};
use crate::config::{Affinity, Per};
use crate::http1::{self, head::RelayedHeaders};
use crate::limits::shared::{Denial, Grant, SharedState};
use crate::limits::{Cost, Headroom, Refusal};
use crate::routing::table::USUAL_ENDPOINTS;
use crate::routing::{CallerRoute, KeyAsk, KeyPick, RoutingTable};
use crate::secret::sha256;
use crate::state::AppState;
use crate::upstream;
use crate::usage::UsageRecord;

/// The endpoint as the usage row holds it: a shared name for the usual ones.
fn usage_endpoint(endpoint: &str) -> Cow<'static, str> {
    match USUAL_ENDPOINTS.into_iter().find(|e| *e == endpoint) {
        Some(e) => Cow::Borrowed(e),
        None => Cow::Owned(endpoint.to_owned()),
    }
}

/// `req_` and 32 random hex digits.
fn new_request_id() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req_00000000000000000000000000000000";
    let random = fastrand::u128(..).to_be_bytes();
    for (digits, byte) in id[4..].chunks_exact_mut(2).zip(random) {
        digits[0] = HEX[usize::from(byte >> 4)];
        digits[1] = HEX[usize::from(byte & 0xf)];
    }
    id
}

/// A request body as the handler reads it: hyper's `Incoming`, or the
/// body the HTTP/1.1 fast path has already read (`server::h1_loop::FastBody`).
pub trait RequestBodyStream:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> RequestBodyStream for B where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// Why the fast path gives no request body: the caller stopped sending it
/// for `header_read_timeout` (408), or its Content-Length is over
/// `max_body_bytes` (413). Other body errors are 400.
#[derive(Debug, thiserror::Error)]
pub enum BodyCut {
    #[error("the request body stalled")]
    Stalled,
    #[error("the request body is too large")]
    TooLarge,
}

/// Answers one request, from the HTTP/1.1 fast path or from hyper.
/// `conflicting_framing`: the request had both `Content-Length` and
/// `Transfer-Encoding` on the wire (only hyper's path sees such requests).
/// `presented`: the hash of the token the request presents, when the
/// server loop already took it ([`check_head`]).
/// Not an `async fn`: its future is the error shape's scope itself, which
/// then holds the arguments once.
pub fn handle<B: RequestBodyStream>(
    state: Arc<AppState>,
    req: Request<B>,
    conflicting_framing: bool,
    peer: Option<SocketAddr>,
    presented: Option<TokenHash>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    let id = new_request_id();
    let rid_header = HeaderValue::from_bytes(&id).expect("request ids are ASCII hex");
    let shape = anthropic::error_shape(req.uri().path());
    shape.scope(async move {
        // ASCII by construction: never the empty default.
        let request_id = std::str::from_utf8(&id).unwrap_or_default();
        if conflicting_framing {
            let msg = "the request has both Content-Length and Transfer-Encoding".to_owned();
            let mut resp = ApiError::InvalidRequest(msg).into_response(Some(&rid_header));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        let cors = cors::allowed_origin(&state, req.headers());
        let logged = access::Request::begin(&state, &req, peer);
        let mut resp = match access::within(
            logged,
            dispatch(&state, req, request_id, peer, presented),
            answer_status,
        )
        .await
        {
            Ok(resp) => resp,
            Err(e) => e.into_response(None),
        };
        resp.headers_mut().insert(X_REQUEST_ID, rid_header);
        if let Some(origin) = cors {
            cors::mark(resp.headers_mut(), origin);
        }
        Ok(resp)
    })
}

/// The status an answer is logged with when no `Completion` logged it.
fn answer_status(answer: &Result<Response<ResponseBody>, ApiError>) -> StatusCode {
    match answer {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    }
}

async fn dispatch<B: RequestBodyStream>(
    state: &Arc<AppState>,
    req: Request<B>,
    request_id: &str,
    peer: Option<SocketAddr>,
    presented: Option<TokenHash>,
) -> Result<Response<ResponseBody>, ApiError> {
    let table = state.table.load_full();
    // The request's parts stay here, and everything below borrows them:
    // the path, the endpoint and the headers are never copied.
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    if let Some(preflight) = cors::preflight(&table, method, &parts.headers) {
        return Ok(preflight);
    }
    match route(path) {
        Route::Healthz => Ok(endpoints::text(StatusCode::OK, "ok\n")),
        Route::Readyz => Ok(endpoints::readyz(&table)),
        // Boxed: the admin endpoints' future is many times the size of
        // the proxy's, and every request's future would otherwise carry
        // (and move) that room.
        Route::Admin(what) => {
            Box::pin(endpoints::admin(
                state,
                &table,
                method,
                what,
                parts.uri.query(),
                &parts.headers,
            ))
            .await
        }
        Route::NotFound => Err(ApiError::NotFound(format!("no route for {method} {path}"))),
        route => {
            let caller = authenticate(state, &table, path, &parts.headers, peer, presented)?
                .map(|(caller, _)| caller);
            match route {
                Route::Metrics => Ok(endpoints::metrics(state, &table)),
                Route::Models if method == Method::GET => Ok(endpoints::models(
                    state,
                    &table,
                    caller.map(|i| &table.callers[i].cfg),
                )),
                Route::Model(id) if method == Method::GET => {
                    endpoints::model(&table, &id, caller.map(|i| &table.callers[i].cfg))
                }
                Route::Proxy { client, endpoint } => {
                    if client.is_none() && method != Method::POST {
                        return Err(ApiError::MethodNotAllowed(format!(
                            "{method} is not allowed on /v1/{endpoint}; use POST"
                        )));
                    }
                    let pinned = match client {
                        Some(name) => Some(table.client_index(name).ok_or_else(|| {
                            ApiError::NotFound(format!("no client named `{name}`"))
                        })?),
                        None => None,
                    };
                    if let Some(e) =
                        pinned.and_then(|ci| anthropic::pinned_mismatch(&table, ci, endpoint))
                    {
                        return Err(e);
                    }
                    let request = Caller {
                        parts: &parts,
                        endpoint,
                        request_id,
                        caller,
                        pinned,
                    };
                    Ok(proxy(state.clone(), table, request, body).await)
                }
                _ => Err(ApiError::MethodNotAllowed(format!(
                    "{method} is not allowed on {path}"
                ))),
            }
        }
    }
}

/// Why a request presented no usable token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    Missing,
    Invalid,
}

impl AuthFailure {
    fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// The SHA-256 of the token a request presents: callers are looked up by
/// it. Hashing a token costs more than the rest of an authentication, so
/// the server loop's check on the head hands its hash on to the handler.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

/// Finds the caller whose token the request presents, with the token's
/// hash: the token is hashed once (or its hash taken from `presented`,
/// made from these same headers) and looked up, so neither its bytes nor
/// the number of callers show in the time taken. `None` when no caller or
/// token is configured.
fn authenticate(
    state: &AppState,
    table: &RoutingTable,
    path: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    presented: Option<TokenHash>,
) -> Result<Option<(usize, TokenHash)>, ApiError> {
    if table.callers.is_empty() {
        return Ok(None);
    }
    let failure = match anthropic::caller_token(path, headers) {
        None => AuthFailure::Missing,
        Some(token) => {
            let hash = presented.unwrap_or_else(|| TokenHash(sha256(token.as_bytes())));
            match table.caller_by_token(&hash.0) {
                Some(caller) => return Ok(Some((caller, hash))),
                None => AuthFailure::Invalid,
            }
        }
    };
    state.metrics.auth_failure(failure.reason());
    AUTH_LOG[failure as usize].log(failure.reason(), peer);
    Err(ApiError::Unauthorized(match failure {
        AuthFailure::Missing if anthropic::is_anthropic_path(path) => {
            "missing token: send `x-api-key: <token>` or `Authorization: Bearer <token>`".to_owned()
        }
        AuthFailure::Missing => {
            "missing bearer token: send `Authorization: Bearer <token>`".to_owned()
        }
        AuthFailure::Invalid => "invalid bearer token".to_owned(),
    }))
}

/// At most one log line a second per reason of refused logins, with the
/// count of those not logged: a caller trying tokens cannot flood the log.
struct AuthLog {
    /// The second of the last line, since the epoch.
    last: AtomicU64,
    suppressed: AtomicU64,
}

static AUTH_LOG: [AuthLog; 2] = [AuthLog::new(), AuthLog::new()];

impl AuthLog {
    const fn new() -> AuthLog {
        AuthLog {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn log(&self, reason: &str, peer: Option<SocketAddr>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if now == last
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let peer = peer.map(|p| p.to_string());
        tracing::warn!(
            reason,
            peer = peer.as_deref().unwrap_or("-"),
            suppressed,
            "request refused: bad bearer token"
        );
    }
}

/// The fast path's check of a request's head, before it reads a body: a
/// request for a path that needs a token and does not carry a valid one
/// is refused (`Err`, boxed: it is rare), its body never read (and the
/// connection closes). Else the hash of the token it presents, if one was
/// checked, for [`handle`].
pub fn check_head(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<Option<TokenHash>, Box<Response<ResponseBody>>> {
    let table = state.table.load();
    // Without callers there is no token to check: the path is not even
    // routed (the handler routes it once more).
    if table.callers.is_empty() {
        return Ok(None);
    }
    match route(path) {
        Route::Healthz | Route::Readyz | Route::Admin(_) | Route::NotFound => Ok(None),
        _ => anthropic::error_shape(path).sync_scope(|| {
            match authenticate(state, &table, path, headers, peer, None) {
                Ok(found) => Ok(found.map(|(_, hash)| hash)),
                Err(refused) => {
                    let mut resp = refused.into_response(None);
                    if let Some(origin) = cors::allowed_origin(state, headers) {
                        cors::mark(resp.headers_mut(), origin);
                    }
                    Err(Box::new(resp))
                }
            }
        }),
    }
}

/// Reads the whole request body, within `max_body_bytes`; each chunk must
/// arrive within `header_read_timeout` of the one before.
async fn read_body<B: RequestBodyStream>(
    body: B,
    headers: &HeaderMap,
    limit: u64,
    gap: Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| http1::framing::content_length(v.as_bytes()));
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = body;
    // Chunks are kept as they came (no copy) and joined only if there are
    // several; the usual one-chunk body allocates nothing here.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut len: u64 = 0;
    loop {
        match tokio::time::timeout(gap, body.frame()).await {
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body stalled for {gap:?}"
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let e: BoxError = e.into();
                match e.downcast_ref::<BodyCut>() {
                    Some(BodyCut::Stalled) => {
                        return Err(ApiError::RequestTimeout(format!(
                            "the request body stalled for {gap:?}"
                        )))
                    }
                    Some(BodyCut::TooLarge) => return Err(ApiError::TooLarge { limit }),
                    None => {}
                }
                return Err(ApiError::InvalidRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    if len > limit {
                        return Err(ApiError::TooLarge { limit });
                    }
                    if first.is_none() {
                        first = Some(data);
                    } else {
                        more.push(data);
                    }
                }
            }
        }
    }
    Ok(match (first, more.is_empty()) {
        (None, _) => Bytes::new(),
        (Some(one), true) => one,
        (Some(one), false) => {
            let mut buf = BytesMut::with_capacity(len as usize);
            buf.extend_from_slice(&one);
            for c in more {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    })
}

/// Fails a request that had started: the row and log say why.
fn fail(mut done: Completion, e: ApiError, request_id: &str) -> Response<ResponseBody> {
    done.record().status = e.status().as_u16();
    let message = e.to_string();
    let resp = e.into_response(HeaderValue::from_str(request_id).ok().as_ref());
    done.finish(None, Some(message));
    resp
}

/// What [`proxy`] is asked, borrowed from the caller's request.
struct Caller<'a> {
    parts: &'a http::request::Parts,
    endpoint: &'a str,
    request_id: &'a str,
    /// The caller's index in the table's callers, when auth is on.
    caller: Option<usize>,
    /// The client named in the path (`/{client}/v1/...`), if any.
    pinned: Option<usize>,
}

async fn proxy<B: RequestBodyStream>(
    state: Arc<AppState>,
    table: Arc<RoutingTable>,
    caller: Caller<'_>,
    body: B,
) -> Response<ResponseBody> {
    let mut headroom = None;
    let mut resp = proxy_admitted(state, &table, caller, body, &mut headroom).await;
    if let Some(h) = headroom {
        // Figures, not header values: the server writes them into the
        // head (hyper's path merges them into the map first).
        resp.extensions_mut().insert(RateLimitHeaders(h));
    }
    resp
}

/// [`proxy`], with the caller's `x-ratelimit-*` figures left in
/// `headroom` once its limits admitted the request.
async fn proxy_admitted<B: RequestBodyStream>(
    state: Arc<AppState>,
    table: &Arc<RoutingTable>,
    caller: Caller<'_>,
    body: B,
    headroom: &mut Option<Headroom>,
) -> Response<ResponseBody> {
    let Caller {
        parts,
        endpoint,
        request_id,
        caller,
        pinned,
    } = caller;
    let caller = caller.map(|i| &table.callers[i]);
    let started = Instant::now();
    let record = Box::new(UsageRecord {
        ts: Some((state.clock)()),
        request_id: request_id.to_owned(),
        caller: caller.map(|c| c.name.clone()),
        endpoint: usage_endpoint(endpoint),
        ..UsageRecord::default()
    });
    let mut done = Completion::start(state.clone(), record, started);
    done.caller_metrics = caller.map(|c| c.metrics.clone());
    let server = &table.config.server;
    let bytes = match read_body(
        body,
        &parts.headers,
        server.max_body_bytes,
        server.header_read_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return fail(done, e, request_id),
    };
    let is_json_object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    // A form upload (audio transcriptions, image edits) names its model in
    // a part of its own; the body goes upstream as it came.
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|ct| multipart::boundary(ct.as_bytes()));
    let peek = if let Some(boundary) = form {
        match multipart::model(&bytes, boundary).map(transform::usable_model) {
            Some(Ok(m)) => transform::Peek {
                model: Some(m),
                ..transform::Peek::default()
            },
            Some(Err(msg)) => return fail(done, ApiError::InvalidRequest(msg), request_id),
            None => transform::Peek::default(),
        }
    } else if pinned.is_some() && !is_json_object {
        transform::Peek::default()
    } else {
        match transform::peek(&bytes) {
            Ok(p) => p,
            Err(msg) => return fail(done, ApiError::InvalidRequest(msg), request_id),
        }
    };
    done.record().model = peek.model.clone();
    done.record().stream = peek.stream;
    let model = match (&peek.model, pinned) {
        (Some(m), _) => Some(&**m),
        (None, Some(_)) => None,
        (None, None) => {
            return fail(
                done,
                ApiError::InvalidRequest("the request body has no `model`".to_owned()),
                request_id,
            )
        }
    };
    // The requested model's candidates, looked up once: for the 404 here
    // and for the first round of attempts below.
    let mut first_candidates = None;
    let api = anthropic::api_of(endpoint);
    if pinned.is_none() {
        let m = model.unwrap_or_default();
        let candidates = table.candidates_of(api, m);
        if candidates.is_empty() {
            return fail(done, anthropic::model_not_found(table, api, m), request_id);
        }
        first_candidates = Some(candidates);
    }
    if let Some(c) = caller {
        let priced: SmallVec<[usize; 4]> = match (&first_candidates, pinned) {
            (Some(cands), _) => cands.in_priority_order().collect(),
            (None, Some(ci)) => smallvec![ci],
            (None, None) => SmallVec::new(),
        };
        let estimate = Estimate {
            body_bytes: bytes.len(),
            max_tokens: peek.max_tokens,
            model,
            clients: &priced,
        };
        match admit(&state, table, c, &estimate, &mut done) {
            Ok(Admitted::Done(h)) => *headroom = h,
            // Boxed: only requests under shared state pay for its future.
            Ok(Admitted::Shared(shared, cost)) => {
                match Box::pin(admit_shared(&state, shared, c, cost, &mut done)).await {
                    Ok(h) => *headroom = h,
                    Err(e) => return fail(done, e, request_id),
                }
            }
            Err(e) => return fail(done, e, request_id),
        }
    }

    if let Some(rule) = shadow::choose(table, model, peek.stream, || (state.clock)()) {
        done.mirror = Some(Box::new(shadow::Mirror {
            table: table.clone(),
            rule,
            method: parts.method.clone(),
            endpoint: endpoint.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            body: bytes.clone(),
            request_id: request_id.to_owned(),
            caller: caller.map(|c| c.name.clone()),
            model: peek.model.clone(),
        }));
    }

    let kind = EndpointKind::of(endpoint);
    let request_bytes = bytes.len();
    let request = Prepared {
        method: &parts.method,
        endpoint,
        query: parts.uri.query(),
        headers: &parts.headers,
        body: RequestBody::new(bytes),
        kind,
        requested_model: peek.model.as_ref(),
        include_usage: peek.stream && kind.is_text_generation() && !peek.include_usage,
        started,
        stream: peek.stream,
        reserve_tokens: reserved_tokens(request_bytes, peek.max_tokens, caller),
        user_hash: peek.user_hash,
        prompt_cache_key_hash: peek.prompt_cache_key_hash,
        caller_name: caller.map(|c| &*c.name),
    };
    let mut run = Run::default();
    let plan = Plan {
        model,
        pinned,
        api,
        first_candidates,
    };
    let all = attempts(&state, table, &request, plan, &mut run, request_id);
    let found = match table.config.routing.deadline {
        None => all.await,
        Some(limit) => match tokio::time::timeout_at((started + limit).into(), all).await {
            Ok(found) => found,
            Err(_) => Err(run.past_deadline(table, model.unwrap_or_default(), limit)),
        },
    };
    match found {
        Ok(Some(answer)) => respond(done, answer, table, &request, &run),
        Ok(None) => {
            let e = run.exhausted(table, model.unwrap_or_default());
            run.blame(table, done.record());
            fail(done, e, request_id)
        }
        Err(e) => {
            run.blame(table, done.record());
            fail(done, e, request_id)
        }
    }
}

/// Where a request may go: its model's candidates (already looked up for
/// the first round) and fallbacks, or the one client its path names.
struct Plan<'t> {
    model: Option<&'t str>,
    pinned: Option<usize>,
    /// Which API's clients may answer (`/v1/messages`: Anthropic's).
    api: crate::config::Api,
    first_candidates: Option<crate::routing::table::CandidatesRef<'t>>,
}

/// Every attempt of one request, across keys, clients and fallbacks, until
/// one answers (`Ok(Some)`) or nothing is left (`Ok(None)`).
async fn attempts(
    state: &Arc<AppState>,
    table: &RoutingTable,
    request: &Prepared<'_>,
    plan: Plan<'_>,
    run: &mut Run,
    request_id: &str,
) -> Result<Option<Answer>, ApiError> {
    let Plan {
        model,
        pinned,
        api,
        mut first_candidates,
    } = plan;
    if let Some(ci) = pinned {
        return try_client(state, table, request, ci, model, run, request_id).await;
    }
    // Model names borrow from the request and the table: none is
    // copied per request.
    // Inline, like the lists below: a request that fails over
    // to more than a few models or clients is rare.
    let mut stack: SmallVec<[(&str, u32); 4]> = smallvec![(model.unwrap_or_default(), 0)];
    let mut models_tried: SmallVec<[&str; 4]> = SmallVec::new();
    let max_depth = table.config.routing.max_fallback_depth;
    let lead = table
        .config
        .routing
        .affinity
        .as_ref()
        .and_then(|from| request.affinity_value(from));
    while let Some((m, depth)) = stack.pop() {
        if models_tried.contains(&m) {
            continue;
        }
        models_tried.push(m);
        let candidates = match first_candidates.take() {
            Some(c) if depth == 0 => c,
            _ => table.candidates_of(api, m),
        };
        for ci in table.order(&candidates, lead, request.reserve_tokens) {
            if let Some(answer) =
                try_client(state, table, request, ci, Some(m), run, request_id).await?
            {
                return Ok(Some(answer));
            }
        }
        let fallback = table.fallback_of(&candidates);
        let limit = candidates
            .in_priority_order()
            .find(|&i| !table.clients[i].cfg.fallback.is_empty())
            .map_or(max_depth, |i| {
                table.clients[i]
                    .cfg
                    .policy
                    .max_fallback_depth
                    .min(max_depth)
            });
        if depth < limit {
            for f in fallback.iter().rev() {
                if !models_tried.contains(&f.as_str()) {
                    stack.push((f, depth + 1));
                }
            }
        }
    }
    Ok(None)
}

/// Tokens a request reserves: the same estimate as a caller's admission
/// (`admit`): the body's bytes / 3 for the prompt, plus the completion cap
/// it names or the caller's default.
fn reserved_tokens(
    body_bytes: usize,
    max_tokens: Option<u64>,
    caller: Option<&CallerRoute>,
) -> u64 {
    let completion = max_tokens.unwrap_or(
        caller.map_or(crate::config::validate::MAX_TOKENS_DEFAULT, |c| {
            c.cfg.max_tokens_default
        }),
    );
    (body_bytes as u64).div_ceil(3).saturating_add(completion)
}

/// What a request is expected to cost, before any upstream is asked.
struct Estimate<'a> {
    body_bytes: usize,
    /// The completion cap the request names.
    max_tokens: Option<u64>,
    model: Option<&'a str>,
    /// The clients that may answer it (priced at the dearest).
    clients: &'a [usize],
}

/// What [`admit`] decided.
enum Admitted<'a> {
    /// Admitted in process (or no limit applies), with its headroom.
    Done(Option<Headroom>),
    /// To reserve this cost in the shared state.
    Shared(&'a Arc<SharedState>, Cost),
}

/// Admits a caller's request: its model against the caller's allow-list,
/// then one atomic reserve-and-check of its estimated cost against every
/// limit. The reservation rides on `done` and is settled when it reports.
/// Under `shared_state` the reservation is left to [`admit_shared`].
fn admit<'a>(
    state: &'a AppState,
    table: &RoutingTable,
    caller: &CallerRoute,
    e: &Estimate<'_>,
    done: &mut Completion,
) -> Result<Admitted<'a>, ApiError> {
    let cfg = &caller.cfg;
    let name = &cfg.name;
    let refuse = |reason: &'static str, err: ApiError| {
        state.metrics.caller_rejected(&caller.name, reason);
        Err(err)
    };
    match e.model {
        Some(m) if !cfg.allows(m) => {
            return refuse(
                "model_not_allowed",
                ApiError::ModelNotAllowed(format!("caller `{name}` may not use model `{m}`")),
            )
        }
        None if cfg.models.is_some() => {
            return refuse(
                "model_not_allowed",
                ApiError::ModelNotAllowed(format!(
                    "the request names no model, and caller `{name}` may use only the models listed for it"
                )),
            )
        }
        _ => {}
    }
    let limits = &cfg.limits;
    if limits.is_empty() {
        return Ok(Admitted::Done(None));
    }
    // Prompt tokens are guessed from the body (a token is about three bytes
    // of JSON or more); the completion is counted at its cap.
    let prompt = (e.body_bytes as u64).div_ceil(3);
    let completion = e.max_tokens.unwrap_or(cfg.max_tokens_default);
    let tokens = Tokens {
        prompt,
        cached: 0,
        completion,
    };
    let mut nanos = Some(0i64);
    for &ci in e.clients {
        let price = e.model.and_then(|m| table.price(ci, m));
        nanos = match (nanos, price) {
            (Some(n), Some(p)) => Some(n.max(p.cost_nanos(tokens))),
            _ => None,
        };
    }
    if nanos.is_none() && limits.budget_usd.is_some() {
        let m = e.model.unwrap_or_default();
        return refuse(
            "model_not_allowed",
            ApiError::ModelNotAllowed(format!(
                "model `{m}` has no price, and caller `{name}` has a budget in USD: add the model to `prices`"
            )),
        );
    }
    let cost = Cost {
        tokens: prompt.saturating_add(completion),
        nanos: nanos.unwrap_or(0),
    };
    if let Some(shared) = &state.shared {
        return Ok(Admitted::Shared(shared, cost));
    }
    match caller.state.admit(limits, cost, (state.clock)()) {
        Ok((ticket, headroom)) => {
            reserved(done, cost);
            done.admission = Some(Admission::Local {
                state: caller.state.clone(),
                ticket,
            });
            Ok(Admitted::Done(Some(headroom)))
        }
        Err(refusal) => {
            state
                .metrics
                .caller_rejected(&caller.name, refusal.reason());
            Err(refusal_error(&caller.cfg, refusal, cost))
        }
    }
}

fn reserved(done: &mut Completion, cost: Cost) {
    let r = done.record();
    r.reserved_tokens = Some(cost.tokens);
    r.reserved_usd = Some(prices::usd(cost.nanos));
}

/// [`admit`]'s reservation in the shared state: one script in Redis, or
/// `on_outage` at once when it does not answer within its timeout.
async fn admit_shared(
    state: &AppState,
    shared: &Arc<SharedState>,
    caller: &CallerRoute,
    cost: Cost,
    done: &mut Completion,
) -> Result<Option<Headroom>, ApiError> {
    let limits = &caller.cfg.limits;
    let now = (state.clock)();
    match shared
        .admit(&caller.name, &caller.state, limits, cost, now)
        .await
    {
        Ok((grant, headroom)) => {
            reserved(done, cost);
            done.admission = match grant {
                Grant::Shared(ticket) => Some(Admission::Shared(Box::new(SharedAdmission {
                    shared: shared.clone(),
                    caller: caller.name.clone(),
                    state: caller.state.clone(),
                    ticket,
                }))),
                Grant::Local(ticket) => Some(Admission::Local {
                    state: caller.state.clone(),
                    ticket,
                }),
            };
            Ok(Some(headroom).filter(|h| h.requests.is_some() || h.tokens.is_some()))
        }
        Err(Denial::Refused(refusal)) => {
            state
                .metrics
                .caller_rejected(&caller.name, refusal.reason());
            Err(refusal_error(&caller.cfg, refusal, cost))
        }
        Err(Denial::Unavailable) => {
            state
                .metrics
                .caller_rejected(&caller.name, "shared_state_unavailable");
            Err(ApiError::SharedStateUnavailable(format!(
                "the shared state at {} does not answer and shared_state.on_outage is deny",
                shared.address()
            )))
        }
    }
}

/// The answer to a caller whose limits refused a request.
fn refusal_error(cfg: &crate::config::CallerConfig, refusal: Refusal, cost: Cost) -> ApiError {
    let name = &cfg.name;
    let limits = &cfg.limits;
    let per = |p: Per| p.as_str();
    match refusal {
        Refusal::Concurrency => ApiError::RateLimited {
            message: format!(
                "caller `{name}` has {} requests in flight, its limit (limits.concurrency)",
                limits.concurrency.unwrap_or(0)
            ),
            retry_after: Duration::from_secs(1),
        },
        Refusal::Rpm { retry_after } => ApiError::RateLimited {
            message: format!(
                "caller `{name}` reached its limit of {} requests per minute (limits.rpm)",
                limits.rpm.unwrap_or(0)
            ),
            retry_after,
        },
        Refusal::Tpm { retry_after } => ApiError::RateLimited {
            message: format!(
                "caller `{name}` reached its limit of {} tokens per minute (limits.tpm); this request reserves {}",
                limits.tpm.unwrap_or(0),
                cost.tokens
            ),
            retry_after,
        },
        Refusal::BudgetUsd { per: p } => ApiError::InsufficientQuota(format!(
            "caller `{name}` has spent its budget in USD for this {} (limits.budget_usd)",
            per(p)
        )),
        Refusal::BudgetTokens { per: p } => ApiError::InsufficientQuota(format!(
            "caller `{name}` has spent its token budget for this {} (limits.budget_tokens)",
            per(p)
        )),
    }
}

/// The parts of the caller's request every attempt reuses.
struct Prepared<'a> {
    method: &'a Method,
    endpoint: &'a str,
    query: Option<&'a str>,
    /// The caller's headers as received; filtered per attempt.
    headers: &'a HeaderMap,
    body: RequestBody,
    kind: EndpointKind,
    requested_model: Option<&'a Arc<str>>,
    include_usage: bool,
    /// When the request arrived: `ttft_ms`, like `latency_ms`, counts
    /// from here, across failovers.
    started: Instant,
    stream: bool,
    /// Tokens the request is expected to use, for keys' quota readings.
    reserve_tokens: u64,
    /// Hashes of the affinity values the request carries (never the values).
    user_hash: Option<u64>,
    prompt_cache_key_hash: Option<u64>,
    caller_name: Option<&'a str>,
}

impl Prepared<'_> {
    /// The hash of the request's value for `from`; `None` when it has none
    /// (an empty header counts as none).
    fn affinity_value(&self, from: &Affinity) -> Option<u64> {
        match from {
            Affinity::Header(name) => self
                .headers
                .get(name)
                .filter(|v| !v.is_empty())
                .map(|v| crate::routing::affinity::hash_value(v.as_bytes())),
            Affinity::BodyUser => self.user_hash,
            Affinity::BodyPromptCacheKey => self.prompt_cache_key_hash,
            Affinity::Caller => self
                .caller_name
                .map(|c| crate::routing::affinity::hash_value(c.as_bytes())),
        }
    }
}

/// What the attempts of one request have done so far.
#[derive(Default)]
struct Run {
    attempts: u32,
    /// Indices into the table's clients, in the order first tried.
    clients_tried: SmallVec<[usize; 4]>,
    soonest_free: Option<Duration>,
    last_error: Option<UpstreamError>,
    /// Whether the request was counted in the affinity metric.
    affinity_counted: bool,
    /// The last (client, key) an attempt went to: a request that fails
    /// is recorded against them, so usage by client shows the failure.
    last_tried: Option<(usize, Arc<str>)>,
}

impl Run {
    /// A failed request's row: its attempts, and the last client and key
    /// tried (none when no attempt was made).
    fn blame(&self, table: &RoutingTable, r: &mut UsageRecord) {
        r.attempts = self.attempts;
        if let Some((ci, key)) = &self.last_tried {
            r.client = Some(table.clients[*ci].name.clone());
            r.key_id = Some(key.clone());
        }
    }

    fn past_deadline(&self, table: &RoutingTable, model: &str, limit: Duration) -> ApiError {
        let tried: Vec<&str> = self
            .clients_tried
            .iter()
            .map(|&ci| table.clients[ci].cfg.name.as_str())
            .collect();
        ApiError::UpstreamTimeout(format!(
            "no upstream answered model `{model}` within {limit:?} (routing.deadline); clients tried: {}",
            if tried.is_empty() { "none".to_owned() } else { tried.join(", ") }
        ))
    }

    fn exhausted(&self, table: &RoutingTable, model: &str) -> ApiError {
        if self.attempts == 0 {
            if let Some(wait) = self.soonest_free {
                return ApiError::NoHealthyUpstream {
                    message: format!(
                        "every key of every client for model `{model}` is cooling down"
                    ),
                    retry_after: wait,
                };
            }
        }
        let last = self
            .last_error
            .as_ref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        let message = format!(
            "no upstream could serve model `{model}`; clients tried: {}{last}",
            if self.clients_tried.is_empty() {
                "none".to_owned()
            } else {
                let names: Vec<&str> = self
                    .clients_tried
                    .iter()
                    .map(|&ci| table.clients[ci].cfg.name.as_str())
                    .collect();
                names.join(", ")
            }
        );
        if self
            .last_error
            .as_ref()
            .is_some_and(UpstreamError::is_timeout)
        {
            ApiError::UpstreamTimeout(message)
        } else {
            ApiError::Upstream(message)
        }
    }
}

/// A response from an upstream that goes to the caller.
struct Answer {
    parts: http::response::Parts,
    body: upstream::UpstreamBody,
    first: Option<Bytes>,
    ttft: Option<Duration>,
    /// When the answer was known (see `Outcome::Respond`).
    at: Instant,
    client: usize,
    key_id: Arc<str>,
    routed_model: Option<Arc<str>>,
    in_flight: crate::routing::key_health::InFlight,
}

/// Tries the keys of one client; `Ok(Some)` is the answer for the caller,
/// `Ok(None)` means move on.
async fn try_client(
    state: &Arc<AppState>,
    table: &RoutingTable,
    request: &Prepared<'_>,
    ci: usize,
    model: Option<&str>,
    run: &mut Run,
    request_id: &str,
) -> Result<Option<Answer>, ApiError> {
    let client = &table.clients[ci];
    let policy = &client.cfg.policy;
    let max_attempts = table.config.routing.max_attempts;
    let routed = client.cfg.upstream_model.as_deref().or(model);
    let changes = Changes {
        model: routed.filter(|r| Some(*r) != request.requested_model.map(|m| &**m)),
        include_usage: request.include_usage,
    };
    let affinity = policy
        .affinity
        .as_ref()
        .map(|from| request.affinity_value(from));
    if let Some(value) = affinity {
        if !std::mem::replace(&mut run.affinity_counted, true) {
            state
                .metrics
                .affinity(if value.is_some() { "hit" } else { "none" });
        }
    }
    let ask = KeyAsk {
        tokens: request.reserve_tokens,
        affinity: affinity.flatten(),
    };
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut client_attempts = 0;
    while run.attempts < max_attempts && client_attempts < policy.max_attempts {
        let ki = match client.pick_key_for(&tried, &ask) {
            KeyPick::Key(i) => i,
            KeyPick::Cooling(left) => {
                run.soonest_free = Some(run.soonest_free.map_or(left, |s| s.min(left)));
                break;
            }
            KeyPick::Exhausted => break,
        };
        let key = &client.keys[ki];
        tried.push(ki);
        run.attempts += 1;
        client_attempts += 1;
        if !run.clients_tried.contains(&ci) {
            run.clients_tried.push(ci);
        }
        run.last_tried = Some((ci, key.label.clone()));
        let body = transform::upstream_body(&request.body, &client.cfg, request.kind, &changes);
        let up = crate::upstream::request::build_request(
            client,
            key,
            request.method,
            request.endpoint,
            request.query,
            request.headers,
            body,
        )
        .map_err(|e| ApiError::InvalidRequest(format!("cannot build the upstream request: {e}")))?;
        let in_flight = key.health.begin();
        key.health.spend_quota(ask.tokens);
        let sent = Instant::now();
        // Boxed: the attempt's future is most of a request's state, and
        // every future that awaits it inline grows by its size and is
        // moved (copied) whole at each level.
        let cooling_before = state.shared.as_ref().map(|_| key.health.cooldown_mark());
        let attempt = Box::pin(attempt::run(
            &state.upstream,
            up,
            policy,
            key,
            request.started,
            sent,
            request.stream,
        ));
        let outcome = attempt.await;
        // A cooldown this attempt started is shared with the other instances.
        if let (Some(shared), Some(before)) = (&state.shared, cooling_before) {
            if key.health.cooldown_mark() > before {
                if let Some(until) = key.health.cooldown_until() {
                    shared.publish_cooldown(&client.cfg.name, key.id.as_str(), until);
                }
            }
        }
        match outcome {
            Outcome::FailOver(e) => {
                if e.is_timeout() {
                    client.ttfb.record(sent.elapsed());
                }
                state.metrics.attempt(&client.name, failover_label(&e));
                tracing::warn!(
                    request_id, client = %client.cfg.name, key = %key.id,
                    attempt = run.attempts, error = %e, "attempt failed, failing over"
                );
                run.last_error = Some(e);
            }
            Outcome::Respond {
                parts,
                body,
                first,
                ttft,
                at,
            } => {
                client
                    .ttfb
                    .record_at(at.saturating_duration_since(sent), at);
                client.metrics(&state.metrics).attempt_ok();
                return Ok(Some(Answer {
                    parts,
                    body,
                    first,
                    ttft,
                    at,
                    client: ci,
                    key_id: key.label.clone(),
                    routed_model: match (routed, request.requested_model) {
                        (Some(r), Some(m)) if r == &**m => Some(m.clone()),
                        (r, _) => r.map(Arc::from),
                    },
                    in_flight,
                }));
            }
        }
    }
    Ok(None)
}

fn failover_label(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect(_) => "connect_error",
        UpstreamError::HeadersTimeout(_) => "timeout",
        UpstreamError::FirstTokenTimeout(_) => "first_token_timeout",
        UpstreamError::EmptyResponse => "empty_response",
        UpstreamError::Status(401 | 403) => "key_rejected",
        UpstreamError::Status(429) => "rate_limited",
        UpstreamError::Status(_) => "status_retry",
    }
}

/// Starts relaying `answer` to the caller; the row is written when it ends.
fn respond(
    mut done: Completion,
    answer: Answer,
    table: &RoutingTable,
    request: &Prepared<'_>,
    run: &Run,
) -> Response<ResponseBody> {
    let client = &table.clients[answer.client];
    let status = answer.parts.status;
    let r = done.record();
    r.attempts = run.attempts;
    r.client = Some(client.name.clone());
    r.key_id = Some(answer.key_id);
    r.routed_model = answer.routed_model;
    r.status = status.as_u16();
    r.ttft_ms = answer.ttft.map(|d| d.as_millis() as u64);
    let media = Media::of(&answer.parts.headers);
    if !status.is_success() {
        r.error = Some(format!("upstream answered {}", status.as_u16()));
    } else if request.kind.is_text_generation() && media == Media::Other {
        // Passed on as sent (a 2xx is never retried), but noted.
        let content_type = answer
            .parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .unwrap_or_default();
        r.error = Some(format!(
            "upstream answered {} with content-type `{content_type}`",
            status.as_u16()
        ));
    }
    done.in_flight = Some(answer.in_flight);
    done.answered_by(client);
    if let Some(m) = &done.record().routed_model {
        let m = m.clone();
        done.price = table.price(answer.client, &m);
    }
    let expect = expect::Expect::of(client.cfg.api, request.kind.is_text_generation());
    let filter = response_filter(
        media,
        answer.parts.status,
        request,
        client.cfg.special_prefix.as_deref(),
        expect,
    );
    let keep_length = matches!(filter, Filter::Json(_) | Filter::Raw);
    let mut resp = Response::new(ResponseBody::Relay(Box::new(Relay::new(
        answer.body,
        answer.first,
        answer.at,
        filter,
        client.cfg.policy.idle_timeout,
        done,
    ))));
    *resp.status_mut() = status;
    let mut parts = answer.parts;
    upstream::relayable_response(&mut parts, keep_length);
    if let Some(relayed) = parts.extensions.remove::<RelayedHeaders>() {
        resp.extensions_mut().insert(relayed);
    }
    *resp.headers_mut() = parts.headers;
    resp
}

/// How the response body is relayed: SSE event by event, JSON with usage
/// read on the side, held whole for a prefix, or untouched.
fn response_filter(
    media: Media,
    status: StatusCode,
    request: &Prepared<'_>,
    prefix: Option<&str>,
    expect: expect::Expect,
) -> Filter {
    let slot = match request.kind {
        EndpointKind::Chat => Some(PrefixSlot::Chat),
        EndpointKind::Completion => Some(PrefixSlot::Completion),
        EndpointKind::Other => None,
    };
    let prefix = match (prefix, slot) {
        (Some(p), Some(slot)) if status.is_success() => Some((p.to_owned(), slot)),
        _ => None,
    };
    match media {
        Media::EventStream => {
            Filter::Sse(SseFilter::new(request.include_usage, prefix).expecting(expect))
        }
        Media::Json => match prefix {
            Some((p, slot)) => Filter::Prefix(PrefixBuffer::new(p, slot)),
            None => Filter::Json(JsonSniffer::new().expecting(expect)),
        },
        Media::Other => Filter::Raw,
    }
}

/// What an upstream's `Content-Type` says the body is, in any letter case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Media {
    /// `text/event-stream`
    EventStream,
    /// Any type naming `json`.
    Json,
    Other,
}

impl Media {
    fn of(headers: &HeaderMap) -> Media {
        let Some(v) = headers.get(header::CONTENT_TYPE) else {
            return Media::Other;
        };
        let v = v.as_bytes().trim_ascii_start();
        let has = |word: &[u8]| v.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word));
        if v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream") {
            Media::EventStream
        } else if has(b"json") {
            Media::Json
        } else {
            Media::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::route::bearer_token;

    #[test]
    fn encoded_separators_are_refused_in_any_case() {
        for bad in ["a%2fb", "a%2Fb", "%2E%2e/x", "x%5C", "x%5cy"] {
            assert_eq!(route(&format!("/v1/{bad}")), Route::NotFound, "{bad}");
        }
        for good in ["chat/completions", "a%20b", "x%2", "files/f%41"] {
            assert!(
                matches!(route(&format!("/v1/{good}")), Route::Proxy { .. }),
                "{good}"
            );
        }
    }

    #[test]
    fn media_is_read_from_content_type_in_any_case() {
        let media = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            }
            Media::of(&h)
        };
        assert_eq!(media(Some("text/event-stream")), Media::EventStream);
        assert_eq!(
            media(Some(" Text/Event-Stream; charset=utf-8")),
            Media::EventStream
        );
        assert_eq!(media(Some("application/json")), Media::Json);
        assert_eq!(
            media(Some("application/problem+JSON; charset=utf-8")),
            Media::Json
        );
        assert_eq!(media(Some("text/plain")), Media::Other);
        assert_eq!(media(Some("text/event")), Media::Other);
        assert_eq!(media(Some("")), Media::Other);
        assert_eq!(media(None), Media::Other);
    }

    #[test]
    fn usage_rows_share_the_usual_endpoint_names_and_copy_the_rest() {
        for e in ["chat/completions", "embeddings", "responses"] {
            assert!(matches!(usage_endpoint(e), Cow::Borrowed(b) if b == e));
        }
        let other = usage_endpoint("audio/speech");
        assert!(matches!(other, Cow::Owned(_)));
        assert_eq!(other, "audio/speech");
    }

    #[test]
    fn bearer_tokens_are_read_one_way() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(bearer_token(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&h("BEARER abc")), Some("abc"));
        assert_eq!(bearer_token(&h("Basic abc")), None);
        assert_eq!(bearer_token(&h("Bearer ")), None);
        assert_eq!(bearer_token(&h("Bearerabc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn request_ids_are_req_and_32_hex_digits() {
        let a = String::from_utf8(new_request_id().to_vec()).unwrap();
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("req_"));
        assert!(a[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(a.as_bytes(), new_request_id());
    }
}
