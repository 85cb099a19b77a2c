//! Header names and values from a parsed HTTP/1.1 head, for the fast
//! path's caller requests and plain-HTTP upstream responses.
//!
//! `HeaderName::from_bytes` walks a table of every standard name, about
//! 150 instructions a name; most names on the wire are a dozen common
//! ones, matched here by length and then bytes.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};

/// The common names, lowercase, grouped by length (see `name`).
static KNOWN: [(&[u8], HeaderName); 19] = [
    (b"te", header::TE),
    (b"host", header::HOST),
    (b"date", header::DATE),
    (b"accept", header::ACCEPT),
    (b"server", header::SERVER),
    (b"trailer", header::TRAILER),
    (b"upgrade", header::UPGRADE),
    (b"connection", header::CONNECTION),
    (b"keep-alive", HeaderName::from_static("keep-alive")),
    (b"user-agent", header::USER_AGENT),
    (b"retry-after", header::RETRY_AFTER),
    (b"content-type", header::CONTENT_TYPE),
    (b"x-request-id", HeaderName::from_static("x-request-id")),
    (b"authorization", header::AUTHORIZATION),
    (b"cache-control", header::CACHE_CONTROL),
    (b"content-length", header::CONTENT_LENGTH),
    (b"accept-encoding", header::ACCEPT_ENCODING),
    (
        b"proxy-connection",
        HeaderName::from_static("proxy-connection"),
    ),
    (b"transfer-encoding", header::TRANSFER_ENCODING),
];

/// The name, or `None` when it is not a valid header name.
pub fn name(bytes: &[u8]) -> Option<HeaderName> {
    known(bytes).or_else(|| HeaderName::from_bytes(bytes).ok())
}

/// The name when it is one of the common ones (any case): those
/// gptbalance reads or replaces in a response, and the usual request ones.
pub fn known(bytes: &[u8]) -> Option<HeaderName> {
    let group = match bytes.len() {
        2 => 0..1,
        4 => 1..3,
        6 => 3..5,
        7 => 5..7,
        10 => 7..10,
        11 => 10..11,
        12 => 11..13,
        13 => 13..15,
        14 => 15..16,
        15 => 16..17,
        16 => 17..18,
        17 => 18..19,
        _ => 0..0,
    };
    KNOWN[group]
        .iter()
        .find(|(known, _)| lowercase_eq(bytes, known))
        .map(|(_, name)| name.clone())
}

/// Whether `bytes` is `lower` in any case. `lower` holds only lowercase
/// letters and `-`: setting bit 0x20 lowercases a letter and leaves `-`
/// alone. The only other byte it maps onto one of those is CR (onto `-`),
/// and names come from httparse, which passes token characters only.
fn lowercase_eq(bytes: &[u8], lower: &[u8]) -> bool {
    bytes.len() == lower.len() && bytes.iter().zip(lower).all(|(b, l)| b | 0x20 == *l)
}

/// A header value sharing the head's bytes. Checked again although
/// httparse accepts in a value exactly the bytes `HeaderValue` allows
/// (HTAB, SP to `~`, 0x80 to 0xFF): the check costs a pass over bytes
/// just read, nothing measurable, and keeps this module free of `unsafe`.
/// `None` cannot happen for a value httparse accepted.
pub fn value(bytes: Bytes) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_match_in_any_case_and_others_parse_as_usual() {
        for n in [
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "retry-after",
            "proxy-connection",
            "host",
            "date",
            "accept",
            "server",
            "connection",
            "user-agent",
            "content-type",
            "authorization",
            "cache-control",
            "content-length",
            "accept-encoding",
            "transfer-encoding",
            "x-request-id",
            "x-ratelimit-remaining-tokens",
            "hosts",
        ] {
            let upper = n.to_ascii_uppercase();
            let mixed: String = n
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            for spelled in [n, upper.as_str(), mixed.as_str()] {
                assert_eq!(
                    name(spelled.as_bytes()),
                    Some(HeaderName::from_bytes(spelled.as_bytes()).unwrap()),
                    "{spelled}"
                );
            }
        }
        // Every common name is found as one, in its length's group.
        for (spelled, want) in &KNOWN {
            assert_eq!(known(spelled).as_ref(), Some(want));
            assert_eq!(known(&spelled.to_ascii_uppercase()).as_ref(), Some(want));
        }
        assert_eq!(known(b"x-ratelimit-limit-tokens"), None);
        assert_eq!(name(b"bad name"), None);
        assert_eq!(name(b""), None);
        assert_eq!(name(b"h\xffst"), None);
    }

    #[test]
    fn values_httparse_accepts_are_valid_header_values() {
        let mut head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        let allowed: Vec<u8> = (0u8..=255)
            .filter(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
            .collect();
        head.extend_from_slice(&allowed);
        head.extend_from_slice(b"\r\n\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&head).unwrap().is_complete());
        let v = req.headers[0].value;
        assert!(HeaderValue::from_bytes(v).is_ok());
        assert_eq!(value(Bytes::copy_from_slice(v)).unwrap().as_bytes(), v);
        for bad in (0u8..32).filter(|&b| b != b'\t').chain([127]) {
            let head = [b"GET / HTTP/1.1\r\nx: a".as_slice(), &[bad], b"b\r\n\r\n"].concat();
            let mut slots = [httparse::EMPTY_HEADER; 4];
            let mut req = httparse::Request::new(&mut slots);
            assert!(req.parse(&head).is_err(), "httparse refuses byte {bad}");
        }
    }
}
