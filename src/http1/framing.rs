//! How a message's body is delimited and whether its connection stays
//! open: `Content-Length`, `Transfer-Encoding` and `Connection` values
//! (RFC 9112 6, 9.6), and the decimal numbers of lengths.
//!
//! Each side folds the values of a head's framing headers as it walks
//! the head once; the folds keep no copy and no allocation.

/// Longest decimal length read: 19 digits always fit in a `u64`.
const MAX_DIGITS: usize = 19;

/// A decimal length: 1 to 19 ASCII digits, nothing else (no sign, no
/// space). `None` for anything else.
pub fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > MAX_DIGITS || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal_digits(&mut [0; 20], n));
}

/// `n` in decimal, written at the end of `digits` (no allocation), two
/// digits per division as `itoa` does: counts of a billion and more are
/// written on every limited caller's response.
pub fn decimal_digits(digits: &mut [u8; 20], mut n: u64) -> &[u8] {
    const PAIRS: &[u8; 200] = b"\
        0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899\
        ";
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        // Byte by byte: `copy_from_slice` is a call where not inlined.
        digits[at] = PAIRS[pair];
        digits[at + 1] = PAIRS[pair + 1];
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at] = PAIRS[pair];
        digits[at + 1] = PAIRS[pair + 1];
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    &digits[at..]
}

/// The comma-separated elements of a field value, trimmed, empty ones
/// left out (RFC 9110 5.6.1).
pub fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// The `Content-Length` of a head, folded over its values: each value a
/// comma-separated list of decimal lengths that must all agree (RFC 9112
/// 6.3 point 5, as hyper reads it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ContentLength {
    length: Option<u64>,
    bad: Option<&'static str>,
}

impl ContentLength {
    /// Reads one `Content-Length` value.
    pub fn add(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',') {
            let Some(n) = decimal(part.trim_ascii()) else {
                self.bad = Some("bad content-length");
                continue;
            };
            if self.length.is_some_and(|l| l != n) {
                self.bad = Some("conflicting content-length");
            }
            self.length = Some(n);
        }
    }

    /// Whether any value was read, valid or not.
    pub fn is_present(&self) -> bool {
        self.length.is_some() || self.bad.is_some()
    }

    /// The length, `None` when there was no value, or why the values are
    /// no length.
    pub fn get(&self) -> Result<Option<u64>, &'static str> {
        match self.bad {
            Some(why) => Err(why),
            None => Ok(self.length),
        }
    }
}

/// The length one `Content-Length` value gives, `None` when it is no
/// valid length.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = ContentLength::default();
    length.add(value);
    length.get().ok().flatten()
}

/// Whether a `Transfer-Encoding` value ends with `chunked`: then the body
/// is chunked (RFC 9112 6.3 point 4; only the last value of the field
/// counts).
pub fn chunked_last(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a `Transfer-Encoding` value names a coding other than
/// `chunked` (an empty element counts as one).
pub fn foreign_coding(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|c| !c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The options of a head's `Connection` values (RFC 9112 9.6), folded
/// over its values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
}

impl Connection {
    /// The options of one `Connection` value.
    pub fn of(value: &[u8]) -> Connection {
        let mut c = Connection::default();
        c.add(value);
        c
    }

    /// Reads one `Connection` value.
    pub fn add(&mut self, value: &[u8]) {
        for token in elements(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            }
        }
    }

    /// Whether the connection may carry another message after this one:
    /// HTTP/1.1 unless it says `close`, HTTP/1.0 only when it says
    /// `keep-alive` (and not `close`).
    pub fn persists(&self, http10: bool) -> bool {
        !self.close && (!http10 || self.keep_alive)
    }
}

/// How a request's body is framed, from its first `Content-Length` value
/// and its last `Transfer-Encoding` value (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// This many bytes (0: no body).
    Length(u64),
    Chunked,
    /// Both a length and a transfer coding: a smuggling shape. hyper lets
    /// chunked win; gptbalance refuses it (400, then the connection
    /// closes).
    Conflict,
    /// A length that is no number, or a coding that does not end with
    /// `chunked`: the server refuses it (400).
    Invalid,
}

impl RequestBody {
    pub fn of(first_length: Option<&[u8]>, last_coding: Option<&[u8]>) -> RequestBody {
        match (first_length, last_coding) {
            (Some(_), Some(_)) => RequestBody::Conflict,
            (None, Some(coding)) if chunked_last(coding) => RequestBody::Chunked,
            (None, Some(_)) => RequestBody::Invalid,
            (Some(length), None) => {
                content_length(length).map_or(RequestBody::Invalid, RequestBody::Length)
            }
            (None, None) => RequestBody::Length(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths_and_their_faults() {
        let fold = |values: &[&str]| {
            let mut l = ContentLength::default();
            for v in values {
                l.add(v.as_bytes());
            }
            l.get()
        };
        assert_eq!(fold(&[]), Ok(None));
        assert_eq!(fold(&["7"]), Ok(Some(7)));
        assert_eq!(fold(&["5, 5", " 5 "]), Ok(Some(5)));
        assert_eq!(fold(&["5", "6"]), Err("conflicting content-length"));
        for bad in ["", "-1", "+1", "0x10", "1 2", "99999999999999999999", "5,"] {
            assert_eq!(fold(&[bad]), Err("bad content-length"), "{bad:?}");
        }
        assert_eq!(decimal(b"0000000000000000007"), Some(7));
        assert_eq!(decimal(b" 7"), None);
    }

    #[test]
    fn connection_options_and_codings() {
        let mut c = Connection::default();
        c.add(b" Keep-Alive ,, UPGRADE");
        assert_eq!(
            c,
            Connection {
                close: false,
                keep_alive: true,
                upgrade: true
            }
        );
        assert!(c.persists(true));
        c.add(b"close");
        assert!(!c.persists(false));
        assert!(!Connection::default().persists(true));
        assert!(chunked_last(b"gzip, Chunked "));
        assert!(!chunked_last(b"chunked, gzip"));
        assert!(foreign_coding(b"gzip, chunked"));
        assert!(foreign_coding(b"chunked,"));
        assert!(!foreign_coding(b"chunked"));
    }

    #[test]
    fn decimals_are_written_at_every_length() {
        // The least and the greatest number of each length.
        let mut edges = vec![0, u64::MAX];
        for len in 1..=19 {
            let least = 10u64.pow(len - 1);
            edges.extend([least, least * 10 - 1]);
        }
        edges.push(10u64.pow(19));
        for n in edges {
            assert_eq!(decimal_digits(&mut [0; 20], n), n.to_string().as_bytes());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every length written is read back as itself, and a length is
        /// read as std reads a plain decimal of at most 19 digits.
        #[test]
        fn decimals_round_trip(n: u64, text in "[0-9+ -]{0,21}") {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            prop_assert_eq!(out, n.to_string().into_bytes());
            if n < 10u64.pow(19) {
                prop_assert_eq!(decimal(n.to_string().as_bytes()), Some(n));
            }
            let std = (text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<u64>().ok())
                .flatten();
            prop_assert_eq!(decimal(text.as_bytes()), std);
        }
    }
}
