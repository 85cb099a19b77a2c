//! Usage rows on their way to the writer, packed end to end in one buffer.
//!
//! A request packs its row into the shared buffer when it reports; the
//! writer takes the whole buffer once a batch and binds text straight out
//! of it. Before, each row crossed threads as a box with strings of its
//! own, allocated on a request thread and read and freed on the writer's:
//! on a busy gateway the writer spent a fifth of its time waiting for
//! those scattered lines of memory and handing the frees back. Now it
//! reads one buffer front to back, and frees nothing per row.
//!
//! A row, in native byte order: the start time as the 24 bytes of its
//! RFC 3339 text (formatted once, by the request), the eleven 64-bit
//! numbers (the two amounts in USD as `f64` bits), attempts, status, a
//! 16-bit flags word (stream, shadow, and which optional numbers are
//! there), then the eight texts, each a 32-bit length (`u32::MAX`: NULL)
//! and its bytes.

use std::time::SystemTime;

use super::UsageRecord;
use crate::calendar::rfc3339_millis;

/// The length that stands for a NULL text.
const NULL_TEXT: u32 = u32::MAX;

const STREAM: u16 = 1;
const TTFT: u16 = 1 << 1;
const PROMPT: u16 = 1 << 2;
const COMPLETION: u16 = 1 << 3;
const TOTAL: u16 = 1 << 4;
const CACHED: u16 = 1 << 5;
const REASONING: u16 = 1 << 6;
const COST: u16 = 1 << 7;
const RESERVED_USD: u16 = 1 << 8;
const RESERVED_TOKENS: u16 = 1 << 9;
const SHADOW: u16 = 1 << 10;

/// One packed row, borrowed from its buffer. Text is bytes: it was UTF-8
/// when packed and goes to SQLite as it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row<'a> {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub ts: &'a [u8; 24],
    pub request_id: &'a [u8],
    pub caller: Option<&'a [u8]>,
    pub endpoint: &'a [u8],
    pub model: Option<&'a [u8]>,
    pub routed_model: Option<&'a [u8]>,
    pub client: Option<&'a [u8]>,
    pub key_id: Option<&'a [u8]>,
    pub status: u16,
    pub stream: bool,
    pub attempts: u32,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub error: Option<&'a [u8]>,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub reserved_usd: Option<f64>,
    pub reserved_tokens: Option<u64>,
    pub shadow: bool,
}

impl<'a> Row<'a> {
    /// `YYYY-MM`: the UTC month of the start, which picks the file.
    pub fn month(&self) -> &'a [u8] {
        &self.ts[..7]
    }
}

/// Rows packed end to end.
#[derive(Debug, Default)]
pub struct RowBuf {
    bytes: Vec<u8>,
    rows: usize,
    /// The first row's month, and whether any other row's differs: the
    /// writer reads a one-month batch (almost every batch) only once.
    month: [u8; 7],
    mixed: bool,
}

impl RowBuf {
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The month of every row, when they all share one.
    pub fn only_month(&self) -> Option<&[u8]> {
        (self.rows > 0 && !self.mixed).then_some(&self.month)
    }

    /// Appends `r`; a row without a start time starts now.
    pub fn push(&mut self, r: &UsageRecord) {
        self.push_stamped(r, &stamp(r));
    }

    /// Appends `r` with its [`stamp`], formatted beforehand (outside the
    /// writer's lock).
    pub fn push_stamped(&mut self, r: &UsageRecord, ts: &[u8; 24]) {
        let month = &ts[..7];
        if self.rows == 0 {
            self.month.copy_from_slice(month);
            self.mixed = false;
        } else if self.month != month {
            self.mixed = true;
        }
        let b = &mut self.bytes;
        b.extend_from_slice(ts);
        let mut flags = if r.stream { STREAM } else { 0 };
        if r.shadow {
            flags |= SHADOW;
        }
        let usd = |v: Option<f64>| v.map(f64::to_bits);
        for (bit, v) in [
            (0, Some(r.latency_ms)),
            (TTFT, r.ttft_ms),
            (PROMPT, r.prompt_tokens),
            (COMPLETION, r.completion_tokens),
            (TOTAL, r.total_tokens),
            (CACHED, r.cached_tokens),
            (REASONING, r.reasoning_tokens),
            (COST, usd(r.cost_usd)),
            (RESERVED_USD, usd(r.reserved_usd)),
            (RESERVED_TOKENS, r.reserved_tokens),
        ] {
            if v.is_some() {
                flags |= bit;
            }
            b.extend_from_slice(&v.unwrap_or(0).to_ne_bytes());
        }
        b.extend_from_slice(&r.attempts.to_ne_bytes());
        b.extend_from_slice(&r.status.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        for text in [
            Some(r.request_id.as_str()),
            r.caller.as_deref(),
            Some(&*r.endpoint),
            r.model.as_deref(),
            r.routed_model.as_deref(),
            r.client.as_deref(),
            r.key_id.as_deref(),
            r.error.as_deref(),
        ] {
            put_text(b, text);
        }
        self.rows += 1;
    }

    /// The rows in the order they were pushed, each with its offset.
    pub fn iter(&self) -> Rows<'_> {
        Rows {
            bytes: &self.bytes,
            at: 0,
            left: self.rows,
        }
    }

    /// The row at `offset`, as [`RowBuf::iter`] gave it.
    pub fn row_at(&self, offset: usize) -> Option<Row<'_>> {
        PackedReader {
            bytes: &self.bytes,
            at: offset,
        }
        .row()
    }

    /// Empties the buffer. Its memory is kept for the next batch, unless
    /// it is far more than this batch needed (after a burst).
    pub fn clear(&mut self) {
        const KEEP: usize = 1 << 20;
        let used = self.bytes.len();
        self.bytes.clear();
        self.rows = 0;
        self.mixed = false;
        if self.bytes.capacity() > KEEP && used < self.bytes.capacity() / 4 {
            self.bytes.shrink_to(used.max(KEEP));
        }
    }
}

/// `r`'s start time as its row stores it; a row without one starts now.
pub fn stamp(r: &UsageRecord) -> [u8; 24] {
    rfc3339_millis(r.ts.unwrap_or_else(SystemTime::now))
}

/// Text longer than a length can say is cut at a character boundary
/// (never happens: names, ids and errors are short).
fn put_text(b: &mut Vec<u8>, text: Option<&str>) {
    let Some(mut t) = text else {
        b.extend_from_slice(&NULL_TEXT.to_ne_bytes());
        return;
    };
    let max = (NULL_TEXT - 1) as usize;
    if t.len() > max {
        let mut end = max;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t = &t[..end];
    }
    b.extend_from_slice(&(t.len() as u32).to_ne_bytes());
    b.extend_from_slice(t.as_bytes());
}

/// The rows of a [`RowBuf`], with their offsets.
pub struct Rows<'a> {
    bytes: &'a [u8],
    at: usize,
    left: usize,
}

impl<'a> Iterator for Rows<'a> {
    type Item = (usize, Row<'a>);

    fn next(&mut self) -> Option<(usize, Row<'a>)> {
        if self.left == 0 {
            return None;
        }
        let mut c = PackedReader {
            bytes: self.bytes,
            at: self.at,
        };
        let Some(row) = c.row() else {
            // Only `push` writes the buffer: this cannot happen.
            debug_assert!(false, "usage row buffer cut short");
            self.left = 0;
            return None;
        };
        let offset = std::mem::replace(&mut self.at, c.at);
        self.left -= 1;
        Some((offset, row))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

struct PackedReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> PackedReader<'a> {
    fn take<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let end = self.at.checked_add(N)?;
        let b = self.bytes.get(self.at..end)?.try_into().ok()?;
        self.at = end;
        Some(b)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(|b| u64::from_ne_bytes(*b))
    }

    fn text(&mut self) -> Option<Option<&'a [u8]>> {
        let len = u32::from_ne_bytes(*self.take()?);
        if len == NULL_TEXT {
            return Some(None);
        }
        let end = self.at.checked_add(len as usize)?;
        let t = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(Some(t))
    }

    fn row(&mut self) -> Option<Row<'a>> {
        let ts = self.take()?;
        let latency_ms = self.u64()?;
        let ttft_ms = self.u64()?;
        let prompt_tokens = self.u64()?;
        let completion_tokens = self.u64()?;
        let total_tokens = self.u64()?;
        let cached_tokens = self.u64()?;
        let reasoning_tokens = self.u64()?;
        let cost_usd = self.u64()?;
        let reserved_usd = self.u64()?;
        let reserved_tokens = self.u64()?;
        let attempts = u32::from_ne_bytes(*self.take()?);
        let status = u16::from_ne_bytes(*self.take()?);
        let flags = u16::from_ne_bytes(*self.take()?);
        let has = |bit: u16, v: u64| (flags & bit != 0).then_some(v);
        Some(Row {
            ts,
            request_id: self.text()?.unwrap_or_default(),
            caller: self.text()?,
            endpoint: self.text()?.unwrap_or_default(),
            model: self.text()?,
            routed_model: self.text()?,
            client: self.text()?,
            key_id: self.text()?,
            status,
            stream: flags & STREAM != 0,
            attempts,
            latency_ms,
            ttft_ms: has(TTFT, ttft_ms),
            prompt_tokens: has(PROMPT, prompt_tokens),
            completion_tokens: has(COMPLETION, completion_tokens),
            total_tokens: has(TOTAL, total_tokens),
            error: self.text()?,
            cached_tokens: has(CACHED, cached_tokens),
            reasoning_tokens: has(REASONING, reasoning_tokens),
            cost_usd: has(COST, cost_usd).map(f64::from_bits),
            reserved_usd: has(RESERVED_USD, reserved_usd).map(f64::from_bits),
            reserved_tokens: has(RESERVED_TOKENS, reserved_tokens),
            shadow: flags & SHADOW != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn record(i: u64) -> UsageRecord {
        UsageRecord {
            ts: Some(UNIX_EPOCH + Duration::from_millis(1_775_000_000_000 + i * 86_400_000)),
            request_id: format!("req_{i}"),
            caller: (i % 2 == 1).then(|| format!("caller {i} ✓").into()),
            endpoint: if i % 3 == 0 {
                "chat/completions".into()
            } else {
                String::new().into()
            },
            model: (i % 3 != 0).then(|| format!("model-{i}").into()),
            routed_model: (i % 4 == 0).then(|| "".into()),
            client: (i % 5 != 0).then(|| format!("client{i}").into()),
            key_id: (i % 6 != 0).then(|| format!("key-{i}").into()),
            status: 100 + i as u16,
            stream: i % 2 == 0,
            attempts: u32::MAX - i as u32,
            latency_ms: u64::MAX - i,
            ttft_ms: (i % 3 == 1).then_some(i),
            prompt_tokens: (i % 2 == 0).then_some(u64::MAX),
            completion_tokens: (i % 3 == 2).then_some(0),
            total_tokens: (i % 4 != 3).then_some(5 * i),
            error: (i % 7 == 3).then(|| "e".repeat(i as usize)),
            cached_tokens: (i % 3 == 0).then_some(i),
            reasoning_tokens: (i % 4 == 1).then_some(u64::MAX),
            cost_usd: (i % 2 == 0).then_some(i as f64 * 0.125),
            reserved_usd: (i % 5 == 2).then_some(-0.0),
            reserved_tokens: (i % 6 == 5).then_some(i * 7),
            shadow: i % 9 == 4,
        }
    }

    fn text(t: Option<&str>) -> Option<&[u8]> {
        t.map(str::as_bytes)
    }

    /// Every field comes back as it went in, NULL, empty and extreme
    /// values included, in order, at the offsets the iterator names.
    #[test]
    fn rows_come_back_as_pushed() {
        let records: Vec<UsageRecord> = (0..40).map(record).collect();
        let mut buf = RowBuf::default();
        for r in &records {
            buf.push(r);
        }
        assert_eq!(buf.len(), records.len());
        let rows: Vec<(usize, Row<'_>)> = buf.iter().collect();
        assert_eq!(rows.len(), records.len());
        for ((offset, row), r) in rows.iter().zip(&records) {
            assert_eq!(buf.row_at(*offset).as_ref(), Some(row));
            let ts = humantime::format_rfc3339_millis(r.ts.unwrap()).to_string();
            assert_eq!(&row.ts[..], ts.as_bytes());
            assert_eq!(row.month(), &ts.as_bytes()[..7]);
            assert_eq!(row.request_id, r.request_id.as_bytes());
            assert_eq!(row.caller, text(r.caller.as_deref()));
            assert_eq!(row.endpoint, r.endpoint.as_bytes());
            assert_eq!(row.model, text(r.model.as_deref()));
            assert_eq!(row.routed_model, text(r.routed_model.as_deref()));
            assert_eq!(row.client, text(r.client.as_deref()));
            assert_eq!(row.key_id, text(r.key_id.as_deref()));
            assert_eq!(
                (row.status, row.stream, row.attempts, row.latency_ms),
                (r.status, r.stream, r.attempts, r.latency_ms)
            );
            assert_eq!(
                (
                    row.ttft_ms,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.total_tokens
                ),
                (
                    r.ttft_ms,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.total_tokens
                )
            );
            assert_eq!(row.error, text(r.error.as_deref()));
            assert_eq!(
                (row.cached_tokens, row.reasoning_tokens, row.reserved_tokens),
                (r.cached_tokens, r.reasoning_tokens, r.reserved_tokens)
            );
            assert_eq!(
                (
                    row.cost_usd.map(f64::to_bits),
                    row.reserved_usd.map(f64::to_bits)
                ),
                (
                    r.cost_usd.map(f64::to_bits),
                    r.reserved_usd.map(f64::to_bits)
                )
            );
            assert_eq!(row.shadow, r.shadow);
        }
        assert_eq!(buf.row_at(buf.bytes.len()), None);
        assert_eq!(buf.only_month(), None, "rows a day apart span months");
        let mut one = RowBuf::default();
        assert_eq!(one.only_month(), None);
        one.push(&records[0]);
        one.push(&records[0]);
        assert_eq!(one.only_month(), Some(&rows[0].1.ts[..7]));
        one.clear();
        one.push(&records[39]);
        assert_eq!(one.only_month(), Some(&rows[39].1.ts[..7]));
    }

    /// A row without a start time is stamped when it is packed.
    #[test]
    fn a_row_without_a_time_starts_now() {
        let before = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut buf = RowBuf::default();
        buf.push(&UsageRecord::default());
        let after = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let (_, row) = buf.iter().next().unwrap();
        let ts = std::str::from_utf8(row.ts).unwrap();
        assert!(
            before.as_str() <= ts && ts <= after.as_str(),
            "{before} {ts} {after}"
        );
    }

    /// A cleared buffer is empty and reusable; one grown far beyond what
    /// its last batch needed gives most of its memory back.
    #[test]
    fn clearing_empties_and_trims_after_a_burst() {
        let mut buf = RowBuf::default();
        for i in 0..20_000 {
            buf.push(&record(i % 7));
        }
        let big = buf.bytes.capacity();
        assert!(big > 2 << 20, "{big}");
        buf.clear();
        assert!(buf.is_empty() && buf.iter().next().is_none());
        assert_eq!(buf.bytes.capacity(), big, "kept after a full batch");
        buf.push(&record(1));
        buf.clear();
        assert!(buf.bytes.capacity() <= 1 << 20, "{}", buf.bytes.capacity());
        buf.push(&record(2));
        assert_eq!(buf.iter().next().unwrap().1.request_id, b"req_2");
    }
}
