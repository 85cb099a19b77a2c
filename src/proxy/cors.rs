//! `server.cors`: browsers' preflights answered, responses marked readable
//! by the origins the config allows.
//!
//! Off unless `server.cors` is set, and then only requests with an allowed
//! `Origin` are touched. A preflight (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) is answered 204 before authentication:
//! browsers send it without the caller's token. Every other response to an
//! allowed origin, errors included, gets `Access-Control-Allow-Origin` (the
//! origin as sent) and `Vary: Origin`, so a browser SDK can read it. A
//! request from another origin gets no CORS header at all, and the browser
//! keeps the answer from the page. Nothing here decides whether a request
//! is authorized: that stays with `handler`.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::body::ResponseBody;
use crate::config::Cors;
use crate::routing::RoutingTable;
use crate::state::AppState;

/// The methods a browser may use: those the gateway serves.
const METHODS: HeaderValue = HeaderValue::from_static("GET, POST, OPTIONS");
/// Response headers a page may read: the request id (for support) and
/// `Retry-After` (which the SDKs honour).
const EXPOSED: HeaderValue = HeaderValue::from_static("x-request-id, retry-after");
/// How long a browser may cache a preflight; browsers cap it lower.
const MAX_AGE: HeaderValue = HeaderValue::from_static("600");

/// The `Origin` of a request the config allows, to echo in the response.
/// `None` when CORS is off, the request has no `Origin`, or it is not
/// allowed. Costs one header lookup when there is no `Origin`.
pub fn allowed_origin(state: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(ORIGIN)?;
    let table = state.table.load();
    let cors = table.config.server.cors.as_ref()?;
    allows(cors, origin).then(|| origin.clone())
}

fn allows(cors: &Cors, origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    cors.allow_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Marks a response to an allowed origin.
pub fn mark(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(VARY, HeaderValue::from_static("origin"));
    headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED);
}

/// The answer to a preflight from an allowed origin; `None` for anything
/// else, which is then handled like any request (an `OPTIONS` gets 405).
pub fn preflight(
    table: &RoutingTable,
    method: &Method,
    headers: &HeaderMap,
) -> Option<Response<ResponseBody>> {
    if method != Method::OPTIONS || !headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let cors = table.config.server.cors.as_ref()?;
    let origin = headers.get(ORIGIN).filter(|o| allows(cors, o))?;
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(ACCESS_CONTROL_ALLOW_METHODS, METHODS);
    let allowed = match &cors.allow_headers {
        Some(names) => HeaderValue::from_str(&names.join(", ")).ok(),
        // Unlisted: whatever the page asks for, which is what a browser
        // SDK's own headers (x-stainless-*, openai-*) need.
        None => headers.get(ACCESS_CONTROL_REQUEST_HEADERS).cloned(),
    };
    if let Some(allowed) = allowed.filter(|v| !v.is_empty()) {
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed);
    }
    h.insert(ACCESS_CONTROL_MAX_AGE, MAX_AGE);
    // `Vary: origin` comes with `mark`, as on every answer to an origin.
    h.append(
        VARY,
        HeaderValue::from_static("access-control-request-method, access-control-request-headers"),
    );
    Some(resp)
}
