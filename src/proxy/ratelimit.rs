//! OpenAI's `x-ratelimit-*` headers of a caller the limits admitted,
//! carried by the response as its figures, not as six header values.
//!
//! The handler leaves a [`RateLimitHeaders`] in the response's
//! extensions. The server loop writes its lines straight into the head,
//! counts and resets formatted on the stack (no allocation, no hashing);
//! hyper, which writes only the header map, gets them from
//! [`RateLimitHeaders::merge`] first, the same bytes in the map. As in
//! the map, the caller's figures replace an upstream's headers of the
//! same names: [`RateLimitHeaders::replaces`] tells the loop which to
//! leave out. `http1::head::RelayedHeaders` rides the same way.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::http1::framing::decimal_digits;
use crate::http1::head::push_field;
use crate::limits::Headroom;

/// The names, per limit: limit, remaining, reset.
const REQUESTS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKENS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// A limited caller's `x-ratelimit-*` figures, as a response extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders(pub Headroom);

/// Longest value written: a `u64` count (20 digits), or a reset
/// (`{h}h{m}m{s}s` with up to 17 digits of hours).
const VALUE_MAX: usize = 32;

impl RateLimitHeaders {
    /// Each header's name and value, the value formatted into `buf`.
    fn each(&self, mut f: impl FnMut(&'static str, &[u8])) {
        let mut buf = [0u8; VALUE_MAX];
        for (limit, names) in [(self.0.requests, REQUESTS), (self.0.tokens, TOKENS)] {
            let Some((max, remaining, reset)) = limit else {
                continue;
            };
            f(names[0], decimal_digits(&mut [0; 20], max));
            f(names[1], decimal_digits(&mut [0; 20], remaining));
            f(names[2], reset_text(&mut buf, reset));
        }
    }

    /// Writes the header lines into a response head.
    pub fn write(&self, out: &mut Vec<u8>) {
        // Room for the longest six lines: one check, not six.
        out.reserve(6 * (REQUESTS[1].len() + VALUE_MAX + 4));
        self.each(|name, value| push_field(out, name.as_bytes(), value));
    }

    /// Whether a header of this name is one the caller's figures replace
    /// (a limit the caller does not have leaves the upstream's as it is).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        let Some(rest) = name.strip_prefix("x-ratelimit-") else {
            return false;
        };
        let (kind, present) = if rest.ends_with("-requests") {
            (REQUESTS, self.0.requests.is_some())
        } else if rest.ends_with("-tokens") {
            (TOKENS, self.0.tokens.is_some())
        } else {
            return false;
        };
        present && kind.contains(&name)
    }

    /// Moves the figures of `extensions`, if any, into `headers`, where
    /// they replace headers of the same names: hyper writes only the map.
    pub fn merge(extensions: &mut http::Extensions, headers: &mut HeaderMap) {
        let Some(figures) = extensions.remove::<RateLimitHeaders>() else {
            return;
        };
        figures.each(|name, value| {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        });
    }
}

/// A duration as OpenAI writes its resets: `20ms`, `1s`, `6m0s`,
/// `1h2m3s`, written at the start of `buf`.
fn reset_text(buf: &mut [u8; VALUE_MAX], d: Duration) -> &[u8] {
    // The usual reset, within a rolling minute, in whole seconds.
    match (d.as_secs(), d.subsec_nanos()) {
        (s @ 1..=9, 0) => {
            buf[0] = b'0' + s as u8;
            buf[1] = b's';
            return &buf[..2];
        }
        (s @ 10..=59, 0) => {
            buf[0] = b'0' + (s / 10) as u8;
            buf[1] = b'0' + (s % 10) as u8;
            buf[2] = b's';
            return &buf[..3];
        }
        (60, 0) => return b"1m0s",
        _ => {}
    }
    let mut out = Writer { buf, len: 0 };
    let ms = d.as_millis();
    if ms < 1000 {
        out.number(ms as u64);
        out.text(b"ms");
    } else {
        let s = d.as_secs();
        let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
        if h > 0 {
            out.number(h);
            out.text(b"h");
        }
        if h > 0 || m > 0 {
            out.number(m);
            out.text(b"m");
        }
        out.number(sec);
        out.text(b"s");
    }
    let len = out.len;
    &buf[..len]
}

/// Appends into a fixed buffer long enough for every reset.
struct Writer<'a> {
    buf: &'a mut [u8; VALUE_MAX],
    len: usize,
}

impl Writer<'_> {
    fn text(&mut self, t: &[u8]) {
        self.buf[self.len..self.len + t.len()].copy_from_slice(t);
        self.len += t.len();
    }

    fn number(&mut self, n: u64) {
        self.text(decimal_digits(&mut [0; 20], n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset(ms: u64) -> String {
        String::from_utf8(reset_text(&mut [0; VALUE_MAX], Duration::from_millis(ms)).to_vec())
            .unwrap()
    }

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        // Every whole second of a minute, against the general rule.
        for s in 0..=61 {
            let general = match (s / 60, s % 60) {
                (0, 0) => "0ms".to_owned(),
                (0, sec) => format!("{sec}s"),
                (m, sec) => format!("{m}m{sec}s"),
            };
            assert_eq!(reset(s * 1000), general);
        }
        assert_eq!(reset(0), "0ms");
        assert_eq!(reset(20), "20ms");
        assert_eq!(reset(999), "999ms");
        assert_eq!(reset(1000), "1s");
        assert_eq!(reset(59_900), "59s");
        assert_eq!(reset(60_000), "1m0s");
        assert_eq!(reset(360_000), "6m0s");
        assert_eq!(reset(3_600_000), "1h0m0s");
        assert_eq!(reset(3_723_000), "1h2m3s");
        // The longest there is fits.
        let mut buf = [0; VALUE_MAX];
        let longest = reset_text(&mut buf, Duration::MAX);
        assert_eq!(longest, b"5124095576030431h0m15s");
    }

    fn figures(requests: bool, tokens: bool) -> RateLimitHeaders {
        RateLimitHeaders(Headroom {
            requests: requests.then_some((3, 2, Duration::from_secs(60))),
            tokens: tokens.then_some((u64::MAX, 0, Duration::from_millis(250))),
        })
    }

    #[test]
    fn the_lines_and_the_map_say_the_same() {
        for (requests, tokens) in [(true, true), (true, false), (false, true), (false, false)] {
            let f = figures(requests, tokens);
            let mut head = Vec::new();
            f.write(&mut head);
            let mut ext = http::Extensions::new();
            ext.insert(f);
            let mut map = HeaderMap::new();
            RateLimitHeaders::merge(&mut ext, &mut map);
            assert!(ext.get::<RateLimitHeaders>().is_none());
            let mut lines = Vec::new();
            for (name, value) in &map {
                push_field(&mut lines, name.as_str().as_bytes(), value.as_bytes());
            }
            assert_eq!(
                String::from_utf8(lines).unwrap(),
                String::from_utf8(head).unwrap()
            );
            assert_eq!(map.len(), 3 * (usize::from(requests) + usize::from(tokens)));
        }
        let mut head = Vec::new();
        figures(true, true).write(&mut head);
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("x-ratelimit-limit-tokens: 18446744073709551615\r\n"));
        assert!(head.contains("x-ratelimit-reset-requests: 1m0s\r\n"));
        assert!(head.contains("x-ratelimit-reset-tokens: 250ms\r\n"));
    }

    #[test]
    fn only_the_caller_s_own_limits_replace_an_upstream_s() {
        let n = HeaderName::from_static;
        let requests_only = figures(true, false);
        assert!(requests_only.replaces(&n("x-ratelimit-remaining-requests")));
        assert!(requests_only.replaces(&n("x-ratelimit-reset-requests")));
        assert!(!requests_only.replaces(&n("x-ratelimit-remaining-tokens")));
        let both = figures(true, true);
        assert!(both.replaces(&n("x-ratelimit-limit-tokens")));
        assert!(!both.replaces(&n("x-ratelimit-remaining")));
        assert!(!both.replaces(&n("x-ratelimit-other-requests")));
        assert!(!both.replaces(&n("content-type")));
    }

    #[test]
    fn the_map_replaces_an_upstream_s_headers_of_the_same_names() {
        let mut map = HeaderMap::new();
        map.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("99"),
        );
        map.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("98"),
        );
        let mut ext = http::Extensions::new();
        ext.insert(figures(true, false));
        RateLimitHeaders::merge(&mut ext, &mut map);
        assert_eq!(map["x-ratelimit-remaining-requests"], "2");
        assert_eq!(map["x-ratelimit-remaining-tokens"], "98");
    }
}
