//! A fast, conservative reading of `model`, `stream`,
//! `stream_options.include_usage`, the completion caps and the affinity
//! values `user` and `prompt_cache_key` from a request body.
//!
//! serde_json spends about 35 instructions per byte on a small chat body
//! (building and matching tokens for every skipped value). This scanner
//! validates the same JSON grammar with a byte loop, but only claims the
//! common shapes: it gives up (`None`) on anything it does not fully judge —
//! escaped keys or model names, `\u` surrogates, exponents, very long
//! numbers, deep nesting, duplicate fields, unexpected types — and the
//! caller then asks serde_json, whose verdict and messages stand. So it
//! never accepts a body serde_json rejects; a property test holds it to
//! that.

/// What [`scan`] reads; `None` for `model` when absent or `null`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    pub model: Option<&'a str>,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_tokens`, a plain unsigned integer.
    pub max_tokens: Option<u64>,
    /// `max_completion_tokens`, likewise.
    pub max_completion_tokens: Option<u64>,
    /// `user` when it is a string without escapes; other types are `None`.
    pub user: Option<&'a str>,
    /// `prompt_cache_key`, likewise.
    pub prompt_cache_key: Option<&'a str>,
}

/// Nesting deeper than this is left to serde_json (its limit is 128).
const MAX_DEPTH: usize = 64;
/// Numbers longer than this are left to serde_json.
const MAX_NUMBER: usize = 40;

/// `Some` only for a valid JSON object whose fields of interest have the
/// usual shapes; `None` means "ask serde_json".
pub fn scan(body: &[u8]) -> Option<Fields<'_>> {
    // Strings are checked byte by byte below; multi-byte UTF-8 is checked
    // here in one pass.
    std::str::from_utf8(body).ok()?;
    let mut s = Scanner { b: body, i: 0 };
    let mut out = Fields::default();
    let (mut seen_model, mut seen_stream, mut seen_options) = (false, false, false);
    let (mut seen_max, mut seen_max_completion) = (false, false);
    let (mut seen_user, mut seen_cache_key) = (false, false);
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            let key = s.plain_string()?;
            s.ws();
            s.eat(b':')?;
            s.ws();
            match key {
                b"model" => {
                    if std::mem::replace(&mut seen_model, true) {
                        return None;
                    }
                    match s.peek()? {
                        b'"' => {
                            let m = s.plain_string()?;
                            // Valid UTF-8: the whole body was checked.
                            out.model = Some(std::str::from_utf8(m).ok()?);
                        }
                        b'n' => s.literal(b"null")?,
                        _ => return None,
                    }
                }
                b"stream" => {
                    if std::mem::replace(&mut seen_stream, true) {
                        return None;
                    }
                    out.stream = s.peek() == Some(b't');
                    s.value(1)?;
                }
                b"stream_options" => {
                    if std::mem::replace(&mut seen_options, true) {
                        return None;
                    }
                    match s.peek()? {
                        b'{' => out.include_usage = s.stream_options()?,
                        b'n' => s.literal(b"null")?,
                        _ => return None,
                    }
                }
                b"max_tokens" => {
                    if std::mem::replace(&mut seen_max, true) {
                        return None;
                    }
                    out.max_tokens = s.count()?;
                }
                b"max_completion_tokens" => {
                    if std::mem::replace(&mut seen_max_completion, true) {
                        return None;
                    }
                    out.max_completion_tokens = s.count()?;
                }
                b"user" => {
                    if std::mem::replace(&mut seen_user, true) {
                        return None;
                    }
                    out.user = s.affinity_value()?;
                }
                b"prompt_cache_key" => {
                    if std::mem::replace(&mut seen_cache_key, true) {
                        return None;
                    }
                    out.prompt_cache_key = s.affinity_value()?;
                }
                _ => s.value(1)?,
            }
            s.ws();
            match s.next()? {
                b',' => s.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    (s.i == body.len()).then_some(out)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string value without escapes (`Some(Some)`), or any value of
    /// another type (`Some(None)`); a string with escapes is left to
    /// serde_json, which decodes it.
    fn affinity_value(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'"' {
            let v = self.plain_string()?;
            // Valid UTF-8: the whole body was checked.
            return Some(Some(std::str::from_utf8(v).ok()?));
        }
        self.value(1)?;
        Some(None)
    }

    /// A count: `Some(Some(n))` for a plain unsigned integer of at most 19
    /// digits, `Some(None)` for `null`; `None` (ask serde_json) otherwise.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        let digits = &self.b[start..self.i];
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        if digits.is_empty()
            || digits.len() > 19
            || leading_zero
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some(Some(
            digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
        ))
    }

    /// `{"include_usage": ...}` and any other members; whether
    /// `include_usage` is `true`.
    fn stream_options(&mut self) -> Option<bool> {
        self.eat(b'{')?;
        self.ws();
        let (mut include, mut seen) = (false, false);
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Some(false);
        }
        loop {
            let key = self.plain_string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            if key == b"include_usage" {
                if std::mem::replace(&mut seen, true) {
                    return None;
                }
                include = self.peek() == Some(b't');
            }
            self.value(2)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(include),
                _ => return None,
            }
        }
    }

    /// Moves past the bytes of a string that need no look of their own
    /// (anything but `"`, `\` and control characters), eight at a time:
    /// message contents are most of a body. Stops on the first such byte,
    /// or within eight bytes of the end of the body.
    fn skip_plain(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // High bit set in the lanes of a word that may hold such a byte;
        // zero exactly when none does (a borrow only runs past a lane
        // that matched).
        let special = |x: u64| {
            let quote = x ^ (ONES * u64::from(b'"'));
            let backslash = x ^ (ONES * u64::from(b'\\'));
            (x.wrapping_sub(ONES * 0x20)
                | quote.wrapping_sub(ONES) & !quote
                | backslash.wrapping_sub(ONES) & !backslash)
                & !x
                & HIGH
        };
        let word = |at: usize| {
            self.b
                .get(at..at + 8)
                .and_then(|w| <[u8; 8]>::try_from(w).ok())
                .map(u64::from_le_bytes)
        };
        // The lowest lane marked is exact (only lanes above a marked one
        // can be marked falsely): the scan stops on the byte itself.
        let first = |mask: u64| (mask.trailing_zeros() / 8) as usize;
        // Most strings are short (keys, roles, model names): their first
        // word holds the closing quote.
        match word(self.i) {
            Some(a) if special(a) == 0 => self.i += 8,
            Some(a) => {
                self.i += first(special(a));
                return;
            }
            None => return,
        }
        // Two words a step: one test and branch per sixteen bytes.
        while let (Some(a), Some(b)) = (word(self.i), word(self.i + 8)) {
            if special(a) | special(b) != 0 {
                // The next loop finds which word, and where.
                break;
            }
            self.i += 16;
        }
        while let Some(a) = word(self.i) {
            let m = special(a);
            if m != 0 {
                self.i += first(m);
                return;
            }
            self.i += 8;
        }
    }

    /// A string without escapes (a key or a model name); its contents.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        // Stops within sixteen bytes of the first byte that needs a look.
        self.skip_plain();
        loop {
            match self.next()? {
                b'"' => return Some(&self.b[start..self.i - 1]),
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => {}
            }
        }
    }

    /// Any string, escapes checked.
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        // Stops within sixteen bytes of the first byte that needs a look;
        // again after each escape.
        self.skip_plain();
        loop {
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.skip_plain(),
                    b'u' => {
                        let hex = self.b.get(self.i..self.i + 4)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        // Surrogates (D800-DFFF) are left to serde_json.
                        if matches!(hex[0], b'd' | b'D')
                            && matches!(hex[1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
                        {
                            return None;
                        }
                        self.i += 4;
                        self.skip_plain();
                    }
                    _ => return None,
                },
                c if c < 0x20 => return None,
                _ => {}
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`; exponents are left to serde_json.
    fn number(&mut self) -> Option<()> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) || self.i - start > MAX_NUMBER {
            return None;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    /// Any JSON value at `depth` (the top-level object is depth 0).
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }
}
