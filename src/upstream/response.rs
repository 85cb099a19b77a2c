//! The one policy for an upstream's response headers, whichever backend
//! read them: what is dropped (hop-by-hop headers), what is kept once, and
//! how the router reads a header either backend may hold.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::http1::framing;
use crate::http1::head::RelayedHeaders;

/// The one policy for an upstream's response headers, whichever backend
/// read them (plain HTTP keeps most as [`RelayedHeaders`] lines, TLS puts
/// all in the map; both are filtered here alike). Dropped: hop-by-hop
/// headers (`Connection` and every name it lists, `Keep-Alive`,
/// `Proxy-Connection`, `Proxy-Authenticate`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`), and `Content-Length` when gptbalance
/// may change the body or the status has no body (1xx, 204, 304). A kept
/// length is written once, however often the upstream repeated it (the
/// framing already refused lengths that disagree).
pub fn relayable_response(parts: &mut http::response::Parts, keep_length: bool) {
    let status = parts.status;
    let keep_length = keep_length
        && !status.is_informational()
        && status != http::StatusCode::NO_CONTENT
        && status != http::StatusCode::NOT_MODIFIED;
    let headers = &mut parts.headers;
    // Usually none: the names the upstream's `Connection` header lists
    // beyond `keep-alive` and `close` (which many send on every response).
    let named: Vec<Vec<u8>> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| framing::elements(v.as_bytes()))
        .filter(|t| !hop_by_hop_response(t) && !t.eq_ignore_ascii_case(b"close"))
        .map(<[u8]>::to_vec)
        .collect();
    let dropped = |name: &[u8]| {
        hop_by_hop_response(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name))
    };
    let length = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if length > 0 {
        if !keep_length {
            headers.remove(header::CONTENT_LENGTH);
        } else if length > 1 || headers[header::CONTENT_LENGTH].as_bytes().contains(&b',') {
            let first = headers[header::CONTENT_LENGTH].as_bytes();
            let n = first.split(|&b| b == b',').next().map(<[u8]>::trim_ascii);
            match n.and_then(|n| HeaderValue::from_bytes(n).ok()) {
                Some(one) => {
                    headers.insert(header::CONTENT_LENGTH, one);
                }
                None => {
                    headers.remove(header::CONTENT_LENGTH);
                }
            }
        }
    }
    if headers.keys().any(|n| dropped(n.as_str().as_bytes())) {
        let drop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| dropped(n.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in drop {
            headers.remove(name);
        }
    }
    if let Some(relayed) = parts.extensions.get_mut::<RelayedHeaders>() {
        relayed.retain(|name| !dropped(name));
    }
}

/// Response headers that are never relayed, in any letter case.
fn hop_by_hop_response(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The values of an upstream response header, whichever backend read it:
/// from the header map, then from the lines plain HTTP only relays. For
/// the router's own reading (`retry-after`, quota headers).
pub fn response_header<'a>(
    parts: &'a http::response::Parts,
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let relayed = parts.extensions.get::<RelayedHeaders>();
    parts
        .headers
        .get_all(name)
        .into_iter()
        .map(HeaderValue::as_bytes)
        .chain(relayed.into_iter().flat_map(move |r| {
            r.iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v)
        }))
}

/// A transfer coding gptbalance cannot relay honestly: any but `chunked`
/// (a `gzip` coding stripped with the header would leave an encoded body
/// that says nothing of it). Refused as an invalid answer.
pub(super) fn foreign_transfer_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| framing::foreign_coding(v.as_bytes()))
}
