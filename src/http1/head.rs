//! Heads: their limits, where one ends, and header lines kept as the
//! head's own bytes.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};

/// Longest head read, on either side, and longest trailer section: the
/// server loop hands a longer request head to hyper (which answers 431
/// for it), the guard stops following, the client refuses the answer.
pub const MAX_HEAD: usize = 64 * 1024;

/// Most header lines parsed in one head; hyper allows as many.
pub const MAX_HEADERS: usize = 100;

/// Appends the header line `name: value`. Two copies of a run of bytes
/// and four bytes pushed: each copy (`extend_from_slice`) is a call to
/// `memcpy`, a byte pushed is a store, and a head has a dozen lines.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.push(b':');
    out.push(b' ');
    out.extend_from_slice(value);
    out.push(b'\r');
    out.push(b'\n');
}

/// Where the head at the start of `buf` ends (just past its empty line),
/// looking from `from` on. Lines end at `\n`, with or without a `\r`
/// before it, as httparse reads them: a head of bare-LF lines ends at
/// `\n\n`, and finding heads by `\r\n\r\n` alone would take the next
/// message's head for part of this one.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &buf[from..]).find_map(|nl| {
        let next = from + nl + 1;
        match buf.get(next..)? {
            [b'\n', ..] => Some(next + 1),
            [b'\r', b'\n', ..] => Some(next + 2),
            _ => None,
        }
    })
}

/// Where a header line's name and value are in its head: (name start,
/// name end, value start, value end). A head is at most a small multiple
/// of [`MAX_HEAD`]: far inside `u32`.
pub type Span = (u32, u32, u32, u32);

/// Response headers gptbalance only relays, as they came: the head and
/// where each line's name and value are in it. A response carries them
/// as an extension; the server loop writes them as they are, and
/// [`RelayedHeaders::merge`] puts them in the header map for hyper.
/// Names are tokens and values valid, as httparse checked them.
#[derive(Clone, Debug)]
pub struct RelayedHeaders {
    head: Bytes,
    spans: Vec<Span>,
}

impl RelayedHeaders {
    /// Lines of `head`, each a span httparse accepted as a header line.
    pub fn new(head: Bytes, spans: Vec<Span>) -> RelayedHeaders {
        RelayedHeaders { head, spans }
    }

    /// Each header's name and value, in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|&(ns, ne, vs, ve)| {
            (
                &self.head[ns as usize..ne as usize],
                &self.head[vs as usize..ve as usize],
            )
        })
    }

    /// Keeps only the headers whose name `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let head = &self.head;
        self.spans
            .retain(|&(ns, ne, _, _)| keep(&head[ns as usize..ne as usize]));
    }

    /// Moves the relayed headers of `extensions`, if any, into `headers`.
    pub fn merge(extensions: &mut http::Extensions, headers: &mut HeaderMap) {
        let Some(relayed) = extensions.remove::<RelayedHeaders>() else {
            return;
        };
        for &(ns, ne, vs, ve) in &relayed.spans {
            if let Ok(name) = HeaderName::from_bytes(&relayed.head[ns as usize..ne as usize]) {
                if let Some(value) =
                    super::names::value(relayed.head.slice(vs as usize..ve as usize))
                {
                    headers.append(name, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_at_their_empty_line_whatever_the_line_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nnext", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nnext", 0), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\n\r\n", 0), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r", 0), None);
    }
}
