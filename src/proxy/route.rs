//! What a request asks for, read from its head alone: the path as a
//! [`Route`] and the caller's bearer token.
//!
//! Read by the handler for every request and by the Anthropic adapter and
//! the admin endpoints, before any body is read. Knows nothing of the
//! routing table: a client named in the path is only checked for shape.

use http::{header, HeaderMap};

use crate::routing::table::USUAL_ENDPOINTS;

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Admin(&'a str),
    Models,
    Model(String),
    /// `/v1/{endpoint}` or `/{client}/v1/{endpoint}`.
    Proxy {
        client: Option<&'a str>,
        endpoint: &'a str,
    },
    NotFound,
}

/// Classifies a path. Endpoints must be plain relative paths: no empty, `.`
/// or `..` segments and no encoded slash, dot or backslash, so a caller can
/// never steer a request outside its client's `base_url`.
pub fn route(path: &str) -> Route<'_> {
    match path {
        "/healthz" => return Route::Healthz,
        "/readyz" => return Route::Readyz,
        "/metrics" => return Route::Metrics,
        "/v1/models" | "/v1/models/" => return Route::Models,
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/admin/") {
        return Route::Admin(rest);
    }
    if let Some(id) = path.strip_prefix("/v1/models/") {
        return match percent_decode(id) {
            Some(id) if !id.is_empty() => Route::Model(id),
            _ => Route::NotFound,
        };
    }
    let (client, endpoint) = match path.strip_prefix("/v1/") {
        Some(endpoint) => (None, endpoint),
        None => {
            let Some(rest) = path.strip_prefix('/') else {
                return Route::NotFound;
            };
            let Some((client, endpoint)) = rest.split_once("/v1/") else {
                return Route::NotFound;
            };
            if client.is_empty()
                || !client
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                return Route::NotFound;
            }
            (Some(client), endpoint)
        }
    };
    if !safe_endpoint(endpoint) {
        return Route::NotFound;
    }
    Route::Proxy { client, endpoint }
}

fn safe_endpoint(endpoint: &str) -> bool {
    // The usual endpoints are safe as they are, without a walk over them.
    if USUAL_ENDPOINTS.contains(&endpoint) {
        return true;
    }
    !endpoint.is_empty()
        && endpoint
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && !endpoint.contains('\\')
        && !has_encoded_separator(endpoint)
}

/// `%2f`, `%2e` or `%5c` in any case: an encoded slash, dot or backslash.
fn has_encoded_separator(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f' | b'e') | (b'5', b'c')
            )
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The token of `Authorization: Bearer <token>`: the scheme in any letter
/// case, the token without the spaces around it. The one reader of bearer
/// tokens, for callers and the admin token alike.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
