//! One upstream request as gptbalance sends it: the caller's method, the
//! client's URL, the caller's headers filtered by the forwarding policy,
//! the key's credential and the client's own headers, and the body.
//!
//! `handler`/`attempt` (and the key probe and model discovery) build an
//! [`Outgoing`] with [`build_request`]; `upstream` sends it, and the plain
//! HTTP/1 client (`h1_client::encode_head`) or hyper's (`into_request`) writes
//! its head. Which caller headers never go upstream is decided here alone
//! ([`not_forwarded`]).

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

use crate::routing::{ClientRoute, KeyRoute};

/// Builds one attempt's request to `client` with `key`; `caller_headers`
/// are filtered as the head is written.
pub fn build_request<'a>(
    client: &'a ClientRoute,
    key: &'a KeyRoute,
    method: &Method,
    endpoint: &str,
    query: Option<&str>,
    caller_headers: &'a HeaderMap,
    body: Cow<'a, Bytes>,
) -> Result<Outgoing<'a>, http::Error> {
    let uri = match (query, client.usual_uri(endpoint)) {
        (None, Some(uri)) => uri.clone(),
        _ => {
            let mut url = String::with_capacity(client.cfg.base_url.len() + endpoint.len() + 2);
            url.push_str(&client.cfg.base_url);
            url.push('/');
            url.push_str(endpoint);
            if let Some(q) = query {
                url.push('?');
                url.push_str(q);
            }
            url.parse::<Uri>()?
        }
    };
    Ok(Outgoing {
        method: method.clone(),
        uri,
        headers: OutHeaders::Routed {
            caller: caller_headers,
            credential: &key.credential,
            extra: &client.cfg.headers,
        },
        body,
    })
}

/// One upstream request. A routed request keeps the caller's headers by
/// reference and filters them as its head is written: the plain-HTTP path
/// writes them straight into its output buffer, and only the TLS path
/// (hyper's client) builds a header map from them. Building and dropping a
/// map per attempt was about a twentieth of a request's CPU.
pub struct Outgoing<'a> {
    pub method: Method,
    /// Absolute: the scheme and authority pick the connection.
    pub uri: Uri,
    headers: OutHeaders<'a>,
    /// The caller's body as it came (borrowed: no reference count to
    /// take and drop per attempt) or as changed for this client.
    pub body: Cow<'a, Bytes>,
}

enum OutHeaders<'a> {
    /// The caller's headers minus those never forwarded (and any its
    /// `Connection` header names or `extra` replaces), then the key's
    /// credential headers (`Authorization`, `api-key`, or `x-api-key` and
    /// `anthropic-version`, which replace the caller's of the same name),
    /// `Accept-Encoding: identity`, a JSON `Content-Type` for a POST
    /// without one, then the client's `extra`.
    Routed {
        caller: &'a HeaderMap,
        credential: &'a [(HeaderName, HeaderValue)],
        extra: &'a [(HeaderName, HeaderValue)],
    },
    /// Exactly these.
    Whole(HeaderMap),
}

impl From<Request<Bytes>> for Outgoing<'static> {
    fn from(req: Request<Bytes>) -> Self {
        let (parts, body) = req.into_parts();
        Outgoing {
            method: parts.method,
            uri: parts.uri,
            headers: OutHeaders::Whole(parts.headers),
            body: Cow::Owned(body),
        }
    }
}

impl Outgoing<'_> {
    /// Calls `f` with every header sent, in order.
    pub fn for_each_header(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        let (caller, credential, extra) = match &self.headers {
            OutHeaders::Whole(map) => return map.iter().for_each(|(n, v)| f(n, v)),
            OutHeaders::Routed {
                caller,
                credential,
                extra,
            } => (caller, credential, extra),
        };
        let ours = |name: &HeaderName| credential.iter().any(|(n, _)| n == name);
        let replaced = |name: &HeaderName| extra.iter().any(|(n, _)| n == name);
        // Usually absent: the names a caller's `Connection` header lists.
        let named_by_connection: Vec<String> = caller
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        let mut has_content_type = false;
        for (name, value) in caller.iter() {
            let n = name.as_str();
            if not_forwarded(n)
                || named_by_connection.iter().any(|c| c == n)
                || replaced(name)
                || ours(name)
            {
                continue;
            }
            has_content_type |= name == header::CONTENT_TYPE;
            f(name, value);
        }
        for (name, value) in credential.iter() {
            if !replaced(name) {
                f(name, value);
            }
        }
        if !replaced(&header::ACCEPT_ENCODING) {
            f(&header::ACCEPT_ENCODING, &IDENTITY);
        }
        if !has_content_type && self.method == Method::POST && !replaced(&header::CONTENT_TYPE) {
            f(&header::CONTENT_TYPE, &JSON);
        }
        for (name, value) in extra.iter() {
            f(name, value);
        }
    }

    /// Whether the request carries its own `Host`.
    pub fn has_host(&self) -> bool {
        match &self.headers {
            OutHeaders::Whole(map) => map.contains_key(header::HOST),
            OutHeaders::Routed { extra, .. } => extra.iter().any(|(n, _)| n == header::HOST),
        }
    }

    /// About how many headers are sent, for sizing a buffer.
    pub fn header_count_hint(&self) -> usize {
        match &self.headers {
            OutHeaders::Whole(map) => map.len(),
            OutHeaders::Routed { caller, extra, .. } => caller.len() + extra.len() + 3,
        }
    }

    /// The request as hyper's client takes it.
    pub fn into_request(self) -> Request<Bytes> {
        let headers = match self.headers {
            OutHeaders::Whole(map) => map,
            OutHeaders::Routed { .. } => {
                let mut map = HeaderMap::with_capacity(self.header_count_hint());
                self.for_each_header(|n, v| {
                    map.append(n.clone(), v.clone());
                });
                map
            }
        };
        let mut req = Request::new(self.body.into_owned());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = headers;
        req
    }
}

static IDENTITY: HeaderValue = HeaderValue::from_static("identity");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Caller headers never sent upstream: hop-by-hop headers, the caller's own
/// credentials, and those gptbalance sets itself.
fn not_forwarded(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "api-key"
            | "x-api-key"
            | "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "accept-encoding"
            | "http2-settings"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_requests_carry_the_headers_the_plain_path_writes() {
        let mut caller = HeaderMap::new();
        for (n, v) in [
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("authorization", "Bearer caller"),
            ("content-type", "text/plain"),
            ("x-two", "a"),
            ("x-two", "b"),
            ("x-replaced", "caller"),
        ] {
            caller.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let auth = [(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"))];
        let extra = [(
            HeaderName::from_static("x-replaced"),
            HeaderValue::from_static("config"),
        )];
        let out = Outgoing {
            method: Method::POST,
            uri: Uri::from_static("https://up.example/v1/x"),
            headers: OutHeaders::Routed {
                caller: &caller,
                credential: &auth,
                extra: &extra,
            },
            body: Cow::Owned(Bytes::new()),
        };
        let mut written = Vec::new();
        out.for_each_header(|n, v| written.push(format!("{n}: {}", v.to_str().unwrap())));
        assert_eq!(
            written,
            [
                "content-type: text/plain",
                "x-two: a",
                "x-two: b",
                "authorization: Bearer k",
                "accept-encoding: identity",
                "x-replaced: config"
            ]
        );
        let req = out.into_request();
        let mapped: Vec<String> = req
            .headers()
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(mapped, written);
        assert_eq!(req.uri(), "https://up.example/v1/x");
        assert_eq!(req.method(), Method::POST);
    }
}
