//! Chunked transfer coding (RFC 9112 7.1): the chunk-size line read, and
//! written.
//!
//! A size line is read whole, up to its LF, and only then judged: hex
//! digits, optional spaces or tabs, an optional `;` extension (skipped),
//! and CRLF. Stricter than httparse's `parse_chunk_size` where hyper's own
//! decoder is strict too (a size needs a digit; an extension holds no LF),
//! and where RFC 9112 is (no control byte in an extension): a reader more
//! lenient than the peer's framing is how messages get desynchronised.
//! Sizes stop at 15 significant hex digits (under 2^60): larger is no body
//! anyone sends, and the sum of a chunk's size and a count cannot
//! overflow.

/// Longest chunk-size line read, extensions included.
pub const MAX_LINE: usize = 4096;

/// The last chunk and the empty trailer section: the end of a chunked
/// body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Most significant hex digits in a size.
const MAX_SIGNIFICANT: usize = 15;

/// Why a chunk-size line is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadSize(pub &'static str);

/// The chunk-size line at the start of `buf`: `Ok(Some((line length with
/// its LF, size)))`, `Ok(None)` when no LF has come yet (the caller bounds
/// the wait by [`MAX_LINE`] or its own limit).
pub fn parse_size(buf: &[u8]) -> Result<Option<(usize, u64)>, BadSize> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return Ok(None);
    };
    Ok(Some((end + 1, size(&buf[..end])?)))
}

/// The size from a chunk-size line without its LF.
fn size(line: &[u8]) -> Result<u64, BadSize> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(BadSize("chunk size line without CRLF"));
    };
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BadSize("bad chunk size"));
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BadSize("bad chunk size"));
    }
    let rest = &line[digits..];
    let rest_ok = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        None => true,
        Some(i) => rest[i] == b';',
    };
    let significant = line[..digits].iter().skip_while(|&&b| b == b'0').count();
    if !rest_ok || significant > MAX_SIGNIFICANT {
        return Err(BadSize("bad chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &b| {
        n * 16 + u64::from((b as char).to_digit(16).unwrap_or(0))
    }))
}

/// Appends the size line of an `n`-byte chunk: lowercase hex and CRLF.
pub fn push_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn size_lines() {
        let ok = |s: &str| parse_size(s.as_bytes()).map(|r| r.map(|(_, n)| n));
        assert_eq!(ok("1A\r\n"), Ok(Some(26)));
        assert_eq!(ok("0003 \t;x=\"a;b\"\r\nrest"), Ok(Some(3)));
        assert_eq!(ok("00000000000000000000ff\r\n"), Ok(Some(255)));
        assert_eq!(ok("fffffffffffffff\r\n"), Ok(Some((1 << 60) - 1)));
        assert_eq!(ok("5"), Ok(None));
        for bad in [
            "\r\n",
            ";x\r\n",
            "5\n",
            "5 5\r\n",
            "5;a\x01\r\n",
            "2;a\rb\r\n",
            "zz\r\n",
            "1000000000000000\r\n",
        ] {
            assert!(parse_size(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every size written is read back as itself, from a line of the
        /// length written.
        #[test]
        fn sizes_round_trip(n in 0usize..(1 << 60)) {
            let mut out = Vec::new();
            push_size(&mut out, n);
            prop_assert_eq!(&out, &format!("{n:x}\r\n").into_bytes());
            prop_assert_eq!(parse_size(&out), Ok(Some((out.len(), n as u64))));
        }
    }
}
