//! Reads a key's remaining quota from an upstream's response headers:
//! OpenAI's `x-ratelimit-remaining-*` / `x-ratelimit-reset-*` (Go durations
//! such as `1s`, `6m0s`, `120ms`, `1h2m3.5s`) and Anthropic's
//! `anthropic-ratelimit-*-remaining` / `-reset` (RFC 3339 times).
//!
//! A figure counts only with its reset, and only when both parse: a
//! negative, non-numeric or oversized count, or a reset in a form not
//! listed here, leaves that figure out of the reading (and the key's last
//! reading of it in place). Headers may sit in the `HeaderMap` or, for
//! plain-HTTP upstreams, in [`RelayedHeaders`]: both are read.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::http1::head::RelayedHeaders;
use crate::routing::key_health::{QuotaReading, Remaining};

/// Values longer than this are not quota figures, whatever they hold.
const MAX_VALUE: usize = 64;

/// The figures `headers` (and `relayed`) carry.
pub fn read(headers: &HeaderMap, relayed: Option<&RelayedHeaders>) -> QuotaReading {
    let mut found = Found::default();
    for (name, value) in headers.iter() {
        found.take(name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(r) = relayed {
        for (name, value) in r.iter() {
            found.take(name, value);
        }
    }
    let now = SystemTime::now();
    let pair = |left: Option<u64>, reset: Option<Reset>| {
        let resets_in = match reset? {
            Reset::In(d) => d,
            Reset::At(t) => t.duration_since(now).ok()?,
        };
        Some(Remaining {
            left: left?,
            resets_in,
        })
    };
    QuotaReading {
        requests: pair(found.requests, found.requests_reset),
        tokens: pair(found.tokens, found.tokens_reset),
    }
}

enum Reset {
    In(Duration),
    At(SystemTime),
}

#[derive(Default)]
struct Found {
    requests: Option<u64>,
    requests_reset: Option<Reset>,
    tokens: Option<u64>,
    tokens_reset: Option<Reset>,
}

impl Found {
    fn take(&mut self, name: &[u8], value: &[u8]) {
        // Most response headers are neither: one prefix test each.
        let first = name.first().map(u8::to_ascii_lowercase);
        if !matches!(first, Some(b'x' | b'a')) || value.len() > MAX_VALUE {
            return;
        }
        let Ok(value) = std::str::from_utf8(value) else {
            return;
        };
        let value = value.trim();
        let is = |want: &str| name.eq_ignore_ascii_case(want.as_bytes());
        if is("x-ratelimit-remaining-requests") || is("anthropic-ratelimit-requests-remaining") {
            self.requests = count(value).or(self.requests);
        } else if is("x-ratelimit-remaining-tokens") || is("anthropic-ratelimit-tokens-remaining") {
            self.tokens = count(value).or(self.tokens);
        } else if is("x-ratelimit-reset-requests") {
            self.requests_reset = go_duration(value)
                .map(Reset::In)
                .or(self.requests_reset.take());
        } else if is("x-ratelimit-reset-tokens") {
            self.tokens_reset = go_duration(value)
                .map(Reset::In)
                .or(self.tokens_reset.take());
        } else if is("anthropic-ratelimit-requests-reset") {
            self.requests_reset = rfc3339(value).map(Reset::At).or(self.requests_reset.take());
        } else if is("anthropic-ratelimit-tokens-reset") {
            self.tokens_reset = rfc3339(value).map(Reset::At).or(self.tokens_reset.take());
        }
    }
}

/// A count: plain decimal digits (no sign, no fraction) that fit in u64.
fn count(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// A Go duration as OpenAI writes resets: `<number><unit>` repeated, the
/// number possibly with a fraction, the unit `h`, `m`, `s`, `ms`, `us`,
/// `µs` or `ns`; `0` alone is zero. No sign.
pub fn go_duration(v: &str) -> Option<Duration> {
    if v == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = v;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return None;
        }
        let n: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = next;
    }
    // Far-off resets are capped by the key's reading anyway; this bound
    // only keeps the conversion finite.
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(1e9)))
}

/// `2024-05-01T12:00:30Z`, with optional fraction, or an offset `+HH:MM`.
pub fn rfc3339(v: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        if v.ends_with(['Z', 'z']) {
            return Some(t);
        }
    }
    // An offset: parse the local part, then move it to UTC.
    let (local, offset) = v.split_at(v.len().checked_sub(6)?);
    let sign = match offset.as_bytes().first()? {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    let (hh, mm) = offset[1..].split_once(':')?;
    if hh.len() != 2 || mm.len() != 2 {
        return None;
    }
    let secs = (hh.parse::<i64>().ok()? * 3600 + mm.parse::<i64>().ok()? * 60) * sign;
    let t = humantime::parse_rfc3339_weak(local).ok()?;
    let shift = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        t.checked_sub(shift)
    } else {
        t.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn go_durations_in_every_unit_and_nothing_else() {
        let ms = |v: &str| go_duration(v).map(|d| d.as_millis());
        assert_eq!(ms("1s"), Some(1000));
        assert_eq!(ms("6m0s"), Some(360_000));
        assert_eq!(ms("120ms"), Some(120));
        assert_eq!(ms("1h2m3.5s"), Some(3_723_500));
        assert_eq!(ms("0"), Some(0));
        assert_eq!(ms("1500us"), Some(1));
        for bad in [
            "", "-1s", "1", "s", "1d", "1.s", ".5s", "1 s", "abc", "1s2", "-1",
        ] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn openai_and_anthropic_readings() {
        let r = read(
            &headers(&[
                ("x-ratelimit-remaining-requests", "59"),
                ("x-ratelimit-remaining-tokens", "149984"),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ]),
            None,
        );
        assert_eq!(r.requests.map(|q| q.left), Some(59));
        assert_eq!(
            r.requests.map(|q| q.resets_in),
            Some(Duration::from_secs(1))
        );
        assert_eq!(r.tokens.map(|q| q.left), Some(149_984));
        let at = SystemTime::now() + Duration::from_secs(90);
        let r = read(
            &headers(&[
                ("anthropic-ratelimit-requests-remaining", "0"),
                (
                    "anthropic-ratelimit-requests-reset",
                    &humantime::format_rfc3339(at).to_string(),
                ),
            ]),
            None,
        );
        let left = r.requests.unwrap();
        assert_eq!(left.left, 0);
        assert!(left.resets_in > Duration::from_secs(80), "{left:?}");
        assert_eq!(r.tokens, None);
    }

    #[test]
    fn bad_values_leave_their_figure_out() {
        for (remaining, reset) in [
            ("-1", "1s"),
            ("-5", "1s"),
            ("lots", "1s"),
            ("1.5", "1s"),
            ("99999999999999999999999", "1s"),
            (&"9".repeat(10_000)[..], "1s"),
            ("5", "soon"),
            ("5", "-3s"),
            ("5", "1d"),
            ("5", ""),
        ] {
            let r = read(
                &headers(&[
                    ("x-ratelimit-remaining-requests", remaining),
                    ("x-ratelimit-reset-requests", reset),
                ]),
                None,
            );
            assert_eq!(r, QuotaReading::default(), "{remaining:.20} {reset}");
        }
        // A reset in the past, or not a time.
        for reset in ["2001-01-01T00:00:00Z", "tomorrow", "2030-13-01T00:00:00Z"] {
            let r = read(
                &headers(&[
                    ("anthropic-ratelimit-tokens-remaining", "5"),
                    ("anthropic-ratelimit-tokens-reset", reset),
                ]),
                None,
            );
            assert_eq!(r.tokens, None, "{reset}");
        }
    }

    #[test]
    fn offsets_are_moved_to_utc() {
        let z = rfc3339("2030-01-01T12:00:00Z").unwrap();
        assert_eq!(rfc3339("2030-01-01T14:00:00+02:00"), Some(z));
        assert_eq!(rfc3339("2030-01-01T11:30:00-00:30"), Some(z));
        assert_eq!(rfc3339("2030-01-01T12:00:00+2:00"), None);
    }
}
