//! Server-sent events as they pass: event boundaries, the usage chunk, the
//! first content delta; and `usage` in a whole JSON body.
//!
//! Parses JSON only for the few events that need it (one mentioning
//! `"usage"`, or the first content delta when a prefix is due); every other
//! event is forwarded as the same bytes, without a copy.

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

// Searchers built once: `memmem::find` builds one on every call, which
// costs more than the search over an event or a body's tail.
static USAGE_KEY: LazyLock<memmem::Finder> = LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static USAGE_NULL: LazyLock<memmem::Finder> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\":null"));
static BLANK_LINE: LazyLock<memmem::Finder> = LazyLock::new(|| memmem::Finder::new(b"\n\n"));
static BLANK_LINE_CRLF: LazyLock<memmem::Finder> =
    LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));
use serde_json::Value;

use super::expect::Expect;

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// Prompt tokens served from the provider's cache (part of `prompt_tokens`).
    pub cached_tokens: Option<u64>,
    /// Reasoning tokens (part of `completion_tokens`).
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Reads a `usage` object: chat/completions/embeddings names, or the
    /// responses API's `input_tokens` / `output_tokens`.
    pub fn from_json(v: &Value) -> Option<Usage> {
        let obj = v.as_object()?;
        // A count that is not a number (`null`, as some upstreams send)
        // falls back to the other name, as the typed reader does.
        let count = |k: &str| obj.get(k).and_then(Value::as_u64);
        let get = |a: &str, b: &str| count(a).or_else(|| count(b));
        let detail = |a: &str, b: &str, k: &str| {
            let read = |d: &str| obj.get(d).and_then(|d| d.get(k)).and_then(Value::as_u64);
            read(a).or_else(|| read(b))
        };
        let anthropic_cache = anthropic_cache(
            count("cache_read_input_tokens"),
            count("cache_creation_input_tokens"),
        );
        let u = Usage {
            prompt_tokens: get("prompt_tokens", "input_tokens"),
            completion_tokens: get("completion_tokens", "output_tokens"),
            total_tokens: obj.get("total_tokens").and_then(Value::as_u64),
            cached_tokens: detail(
                "prompt_tokens_details",
                "input_tokens_details",
                "cached_tokens",
            ),
            reasoning_tokens: detail(
                "completion_tokens_details",
                "output_tokens_details",
                "reasoning_tokens",
            ),
        };
        let u = with_anthropic_cache(u, anthropic_cache);
        let total = u
            .total_tokens
            .or(match (u.prompt_tokens, u.completion_tokens) {
                (Some(p), Some(c)) => Some(p.saturating_add(c)),
                _ => None,
            });
        Some(Usage {
            total_tokens: total,
            ..u
        })
    }

    /// Counts read later in a stream over those read before: Anthropic
    /// sends the input counts in `message_start` and the output count in
    /// `message_delta`. The total is their sum once both are known.
    pub fn merged(self, newer: Usage) -> Usage {
        let prompt_tokens = newer.prompt_tokens.or(self.prompt_tokens);
        let completion_tokens = newer.completion_tokens.or(self.completion_tokens);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: match (prompt_tokens, completion_tokens) {
                (Some(p), Some(c)) => Some(p.saturating_add(c)),
                _ => newer.total_tokens.or(self.total_tokens),
            },
            cached_tokens: newer.cached_tokens.or(self.cached_tokens),
            reasoning_tokens: newer.reasoning_tokens.or(self.reasoning_tokens),
        }
    }
}

/// Anthropic's cache counts (read, creation), when either is present.
fn anthropic_cache(read: Option<u64>, creation: Option<u64>) -> Option<(u64, u64)> {
    (read.is_some() || creation.is_some()).then(|| (read.unwrap_or(0), creation.unwrap_or(0)))
}

/// Anthropic's `input_tokens` leave out cached tokens: the prompt is
/// input + cache read + cache creation, and the cache read is `cached_tokens`.
fn with_anthropic_cache(u: Usage, cache: Option<(u64, u64)>) -> Usage {
    let Some((read, creation)) = cache else {
        return u;
    };
    Usage {
        prompt_tokens: Some(
            u.prompt_tokens
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(creation),
        ),
        cached_tokens: u.cached_tokens.or(Some(read)),
        ..u
    }
}

/// Where a `special_prefix` goes in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixSlot {
    /// `choices[0].message.content` / `choices[0].delta.content`.
    Chat,
    /// `choices[0].text`.
    Completion,
}

/// Longest incomplete event kept while waiting for its end; beyond it the
/// bytes are forwarded uninspected.
const MAX_PENDING_EVENT: usize = 1 << 20;

#[derive(Debug)]
pub struct SseFilter {
    pending: BytesMut,
    /// Remove the usage-only chunk (asked for by gptbalance, not the caller).
    drop_usage_chunk: bool,
    prefix: Option<(String, PrefixSlot)>,
    pub usage: Option<Usage>,
    expect: Expect,
    /// An event in the other API's format was seen: usage is unknown.
    pub foreign: bool,
}

enum EventAction {
    Keep,
    Drop,
    Replace(Bytes),
}

impl SseFilter {
    pub fn new(drop_usage_chunk: bool, prefix: Option<(String, PrefixSlot)>) -> Self {
        SseFilter {
            pending: BytesMut::new(),
            drop_usage_chunk,
            prefix,
            usage: None,
            expect: Expect::Any,
            foreign: false,
        }
    }

    pub fn expect(&self) -> Expect {
        self.expect
    }

    /// Notes events in the other API's format than `expect`.
    pub fn expecting(self, expect: Expect) -> Self {
        SseFilter { expect, ..self }
    }

    /// Takes one upstream chunk and queues what the caller gets: whole
    /// events only, as slices of the chunk when untouched.
    pub fn push(&mut self, chunk: Bytes, out: &mut VecDeque<Bytes>) {
        let data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        let mut start = 0;
        let mut emit_from = 0;
        while let Some(len) = event_len(&data[start..]) {
            let end = start + len;
            match self.inspect(&data[start..end]) {
                EventAction::Keep => {}
                EventAction::Drop => {
                    push_slice(&data, emit_from, start, out);
                    emit_from = end;
                }
                EventAction::Replace(bytes) => {
                    push_slice(&data, emit_from, start, out);
                    out.push_back(bytes);
                    emit_from = end;
                }
            }
            start = end;
        }
        push_slice(&data, emit_from, start, out);
        if start < data.len() {
            if data.len() - start > MAX_PENDING_EVENT {
                out.push_back(data.slice(start..));
            } else {
                self.pending.extend_from_slice(&data[start..]);
            }
        }
    }

    /// The upstream ended: forward whatever incomplete event is left.
    pub fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.pending.is_empty() {
            let rest = self.pending.split().freeze();
            match self.inspect(&rest) {
                EventAction::Keep => out.push_back(rest),
                EventAction::Drop => {}
                EventAction::Replace(b) => out.push_back(b),
            }
        }
    }

    fn inspect(&mut self, event: &[u8]) -> EventAction {
        let mentions_usage = USAGE_KEY.find(event).is_some() && USAGE_NULL.find(event).is_none();
        if !mentions_usage && self.prefix.is_none() {
            return EventAction::Keep;
        }
        let Some(mut json) = event_json(event) else {
            return EventAction::Keep;
        };
        if mentions_usage {
            let usage = json
                .get("usage")
                .and_then(Usage::from_json)
                .or_else(|| json.pointer("/response/usage").and_then(Usage::from_json))
                .or_else(|| json.pointer("/message/usage").and_then(Usage::from_json));
            if let Some(u) = usage {
                self.foreign |= self.expect.foreign_event(&json);
                self.usage = Some(match self.usage {
                    Some(before) => before.merged(u),
                    None => u,
                });
                let no_choices = json
                    .get("choices")
                    .is_none_or(|c| c.as_array().is_some_and(|a| a.is_empty()));
                if self.drop_usage_chunk && no_choices {
                    return EventAction::Drop;
                }
            }
        }
        if let Some((prefix, slot)) = &self.prefix {
            if prepend(&mut json, prefix, *slot, true) {
                self.prefix = None;
                let mut out = Vec::with_capacity(event.len() + 16);
                out.extend_from_slice(b"data: ");
                if serde_json::to_writer(&mut out, &json).is_err() {
                    return EventAction::Keep;
                }
                out.extend_from_slice(b"\n\n");
                return EventAction::Replace(Bytes::from(out));
            }
        }
        EventAction::Keep
    }
}

fn push_slice(data: &Bytes, from: usize, to: usize, out: &mut VecDeque<Bytes>) {
    if from < to {
        out.push_back(data.slice(from..to));
    }
}

/// Length of the first complete event in `buf`, blank line included.
pub fn event_len(buf: &[u8]) -> Option<usize> {
    let lf = BLANK_LINE.find(buf).map(|i| i + 2);
    let crlf = BLANK_LINE_CRLF.find(buf).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The JSON of an event's `data:` lines, if they hold one.
fn event_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    if data.is_empty() || data == "[DONE]" {
        return None;
    }
    serde_json::from_str(&data).ok()
}

/// Prepends `prefix` to the first choice's content; false when this JSON
/// has no content to prepend to.
pub fn prepend(json: &mut Value, prefix: &str, slot: PrefixSlot, stream: bool) -> bool {
    let pointer = match (slot, stream) {
        (PrefixSlot::Chat, true) => "/choices/0/delta/content",
        (PrefixSlot::Chat, false) => "/choices/0/message/content",
        (PrefixSlot::Completion, _) => "/choices/0/text",
    };
    match json.pointer_mut(pointer) {
        Some(Value::String(s)) => {
            s.insert_str(0, prefix);
            true
        }
        _ => false,
    }
}

#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageSlot>,
    #[serde(default)]
    response: Option<ResponseWithUsage>,
}

#[derive(serde::Deserialize)]
struct ResponseWithUsage {
    #[serde(default)]
    usage: Option<UsageSlot>,
}

/// The counts of a `usage` object, read without building a JSON tree (no
/// map, no key strings): the response body of every request passes here.
#[derive(serde::Deserialize, Default)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Count,
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(default)]
    total_tokens: Count,
    #[serde(default)]
    prompt_tokens_details: Details,
    #[serde(default)]
    input_tokens_details: Details,
    #[serde(default)]
    completion_tokens_details: Details,
    #[serde(default)]
    output_tokens_details: Details,
    #[serde(default)]
    cache_read_input_tokens: Count,
    #[serde(default)]
    cache_creation_input_tokens: Count,
}

/// The counts gptbalance reads from a `*_tokens_details` object; nothing
/// for any other value.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl<'de> serde::Deserialize<'de> for Details {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Details, D::Error> {
        #[derive(serde::Deserialize)]
        struct Fields {
            #[serde(default)]
            cached_tokens: Count,
            #[serde(default)]
            reasoning_tokens: Count,
        }
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Details;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a details object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Details, A::Error> {
                let f: Fields = serde::Deserialize::deserialize(
                    serde::de::value::MapAccessDeserializer::new(a),
                )?;
                Ok(Details {
                    cached_tokens: f.cached_tokens.0,
                    reasoning_tokens: f.reasoning_tokens.0,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Details, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Details::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_unit<E>(self) -> Result<Details, E> {
                Ok(Details::default())
            }
        }
        d.deserialize_any(Visit)
    }
}

impl UsageFields {
    /// The same reading as [`Usage::from_json`].
    fn usage(&self) -> Usage {
        let read = Usage {
            prompt_tokens: self.prompt_tokens.0.or(self.input_tokens.0),
            cached_tokens: self
                .prompt_tokens_details
                .cached_tokens
                .or(self.input_tokens_details.cached_tokens),
            ..Usage::default()
        };
        let read = with_anthropic_cache(
            read,
            anthropic_cache(
                self.cache_read_input_tokens.0,
                self.cache_creation_input_tokens.0,
            ),
        );
        let prompt_tokens = read.prompt_tokens;
        let completion_tokens = self.completion_tokens.0.or(self.output_tokens.0);
        let total_tokens = self
            .total_tokens
            .0
            .or(match (prompt_tokens, completion_tokens) {
                (Some(p), Some(c)) => Some(p.saturating_add(c)),
                _ => None,
            });
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cached_tokens: read.cached_tokens,
            reasoning_tokens: self
                .completion_tokens_details
                .reasoning_tokens
                .or(self.output_tokens_details.reasoning_tokens),
        }
    }
}

/// A token count: a non-negative integer, or nothing for any other JSON
/// value (as `Value::as_u64` reads it), so an odd field never fails the body.
#[derive(Default)]
struct Count(Option<u64>);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Count, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Count, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Count(None))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A `usage` value: an object's counts, or nothing for any other value.
struct UsageSlot(Option<Usage>);

impl<'de> serde::Deserialize<'de> for UsageSlot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UsageSlot, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UsageSlot;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<UsageSlot, A::Error> {
                let fields: UsageFields = serde::Deserialize::deserialize(
                    serde::de::value::MapAccessDeserializer::new(a),
                )?;
                Ok(UsageSlot(Some(fields.usage())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<UsageSlot, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(UsageSlot(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
            fn visit_unit<E>(self) -> Result<UsageSlot, E> {
                Ok(UsageSlot(None))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Reads `usage` (or the responses API's `response.usage`) from a whole JSON
/// body; Err when the body is not JSON. Only bodies whose framing ended
/// cleanly come here.
///
/// Every non-streaming response passes here, so the common case is read
/// from the end (see [`usage_closing_the_body`]). Anything else (no usage,
/// an odd shape, a non-JSON body) gets the full parse, which skips
/// everything but `usage` without building it.
pub fn usage_in_whole_json(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    let t = body.trim_ascii();
    if t.first() == Some(&b'{') {
        if let Some(u) = usage_closing_the_body(t) {
            return Ok(Some(u));
        }
    }
    let doc: WithUsage = serde_json::from_slice(body)?;
    Ok(doc
        .usage
        .and_then(|u| u.0)
        .or_else(|| doc.response.and_then(|r| r.usage).and_then(|u| u.0)))
}

/// The usage of an object body `t` in the shape upstreams send: its last
/// `"usage"` key holds a plain object ([`plain_usage_fields`]), and after
/// it come only members with plain values (strings, numbers, literals:
/// `service_tier`, `system_fingerprint`) up to the `}` that ends the body.
/// That `}` closes the object holding `usage`, which in a JSON text that
/// starts with `{` and ends there is the top-level one. `None` for
/// anything else, nested usage included, which the full parse decides.
/// Reads only the end of the body: no pass over all of it.
fn usage_closing_the_body(t: &[u8]) -> Option<Usage> {
    let (fields, rest) = plain_usage_fields(usage_values_from_end(t).next()?)?;
    JsonTail(rest)
        .plain_members_to_end()
        .then(|| fields.usage())
}

/// Finds the last `"usage": {...}` key in `tail` (the end of a body, or a
/// whole one).
pub fn usage_in_json_tail(tail: &[u8]) -> Option<Usage> {
    usage_values_from_end(tail).find_map(|rest| {
        if let Some((fields, _)) = plain_usage_fields(rest) {
            return Some(fields.usage());
        }
        let slot = serde_json::Deserializer::from_slice(rest)
            .into_iter::<UsageSlot>()
            .next();
        match slot {
            Some(Ok(UsageSlot(Some(u)))) => Some(u),
            _ => None,
        }
    })
}

/// Where `"usage"` last occurs in `hay`. Found from its `g`, with a SIMD
/// byte search backwards: a body's `g`s are few, and a general reverse
/// substring search cost about three times as much on the usual body.
fn rfind_usage_key(hay: &[u8]) -> Option<usize> {
    let mut end = hay.len();
    while let Some(g) = memchr::memrchr(b'g', &hay[..end]) {
        if g >= 4 && hay.get(g - 4..g + 3) == Some(b"\"usage\"".as_slice()) {
            return Some(g - 4);
        }
        end = g;
    }
    None
}

/// What follows each `"usage":` key in `json`, the last first (among the
/// last eight `"usage"` texts). A quote preceded by an odd number of
/// backslashes is inside a string, and a `"usage"` without `:` after it is
/// a value: neither is the key.
fn usage_values_from_end(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut end = json.len();
    let found = std::iter::from_fn(move || {
        let at = rfind_usage_key(&json[..end])?;
        end = at;
        Some(at)
    });
    found.take(8).filter_map(move |at| {
        let backslashes = json[..at].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 1 {
            return None;
        }
        json[at + 7..].trim_ascii_start().strip_prefix(b":")
    })
}

/// The counts of the `usage` object `json` starts with, read by hand in the
/// shape upstreams send: keys without escapes, counts as plain unsigned
/// integers, other values (the `*_details` objects, nulls) skipped. `None`
/// for anything else (another value, a negative or fractional count, a key
/// twice), which the serde reader then decides: on valid JSON both read the
/// same.
fn plain_usage_fields(json: &[u8]) -> Option<(UsageFields, &[u8])> {
    let mut at = JsonTail(json);
    at.token(b'{')?;
    let mut fields = UsageFields::default();
    let mut seen = 0u16;
    if at.peek_token(b'}') {
        return Some((fields, at.0));
    }
    loop {
        at.token(b'"')?;
        let key = at.plain_key()?;
        at.token(b':')?;
        let slot = match key {
            b"prompt_tokens" => Some((1, &mut fields.prompt_tokens)),
            b"input_tokens" => Some((2, &mut fields.input_tokens)),
            b"completion_tokens" => Some((4, &mut fields.completion_tokens)),
            b"output_tokens" => Some((8, &mut fields.output_tokens)),
            b"total_tokens" => Some((16, &mut fields.total_tokens)),
            b"cache_read_input_tokens" => Some((512, &mut fields.cache_read_input_tokens)),
            b"cache_creation_input_tokens" => Some((1024, &mut fields.cache_creation_input_tokens)),
            _ => None,
        };
        let details = match key {
            b"prompt_tokens_details" => Some((32, &mut fields.prompt_tokens_details)),
            b"input_tokens_details" => Some((64, &mut fields.input_tokens_details)),
            b"completion_tokens_details" => Some((128, &mut fields.completion_tokens_details)),
            b"output_tokens_details" => Some((256, &mut fields.output_tokens_details)),
            _ => None,
        };
        match (slot, details) {
            // serde refuses a field twice; let it decide.
            (Some((bit, _)), _) | (_, Some((bit, _))) if seen & bit != 0 => return None,
            (Some((bit, count)), _) => {
                seen |= bit;
                *count = Count(at.count()?);
            }
            (None, Some((bit, d))) => {
                seen |= bit;
                *d = at.details()?;
            }
            (None, None) => at.skip_value()?,
        }
        match at.next_token()? {
            b',' => continue,
            b'}' => return Some((fields, at.0)),
            _ => return None,
        }
    }
}

/// The unread rest of a JSON text, for [`plain_usage_fields`].
struct JsonTail<'a>(&'a [u8]);

impl<'a> JsonTail<'a> {
    /// Whether the rest is `,"key":value` members with plain values (no
    /// object or array), then `}` and the end of the text.
    fn plain_members_to_end(mut self) -> bool {
        loop {
            match self.next_token() {
                Some(b'}') => return self.0.trim_ascii_start().is_empty(),
                Some(b',') => {}
                _ => return false,
            }
            let key = self.token(b'"').and_then(|()| self.plain_key());
            if key.is_none() || self.token(b':').is_none() {
                return false;
            }
            self.skip_ws();
            if matches!(self.0.first(), None | Some(b'{' | b'[')) || self.skip_value().is_none() {
                return false;
            }
        }
    }

    fn skip_ws(&mut self) {
        self.0 = self.0.trim_ascii_start();
    }

    fn next_token(&mut self) -> Option<u8> {
        self.skip_ws();
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn token(&mut self, want: u8) -> Option<()> {
        (self.next_token()? == want).then_some(())
    }

    fn peek_token(&mut self, want: u8) -> bool {
        self.skip_ws();
        if self.0.first() == Some(&want) {
            self.0 = &self.0[1..];
            true
        } else {
            false
        }
    }

    /// A key's bytes up to its closing quote; `None` when it has escapes.
    fn plain_key(&mut self) -> Option<&'a [u8]> {
        let n = memchr::memchr2(b'"', b'\\', self.0)?;
        if self.0[n] != b'"' {
            return None;
        }
        let key = &self.0[..n];
        self.0 = &self.0[n + 1..];
        Some(key)
    }

    /// A count: `Some` for a plain unsigned integer that fits, `None` (no
    /// count) for `null`, strings, objects and arrays; the outer `None`
    /// hands anything else (negative, fractional, too large) back.
    fn count(&mut self) -> Option<Option<u64>> {
        self.skip_ws();
        let digits = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return match self.0.first()? {
                b'n' | b'"' | b'{' | b'[' | b't' | b'f' => {
                    self.skip_value()?;
                    Some(None)
                }
                _ => None,
            };
        }
        let (number, rest) = self.0.split_at(digits);
        if matches!(rest.first(), Some(b'.' | b'e' | b'E')) || (digits > 1 && number[0] == b'0') {
            return None;
        }
        let mut v: u64 = 0;
        for &d in number {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.0 = rest;
        Some(Some(v))
    }

    /// A `*_tokens_details` value: an object's `cached_tokens` and
    /// `reasoning_tokens` counts (other members skipped), or nothing for
    /// any other value; `None` hands odd shapes back to serde.
    fn details(&mut self) -> Option<Details> {
        self.skip_ws();
        if self.0.first() != Some(&b'{') {
            self.skip_value()?;
            return Some(Details::default());
        }
        self.token(b'{')?;
        let mut d = Details::default();
        let mut seen = 0u8;
        if self.peek_token(b'}') {
            return Some(d);
        }
        loop {
            self.token(b'"')?;
            let key = self.plain_key()?;
            self.token(b':')?;
            let slot = match key {
                b"cached_tokens" => Some((1, &mut d.cached_tokens)),
                b"reasoning_tokens" => Some((2, &mut d.reasoning_tokens)),
                _ => None,
            };
            match slot {
                Some((bit, _)) if seen & bit != 0 => return None,
                Some((bit, count)) => {
                    seen |= bit;
                    *count = self.count()?;
                }
                None => self.skip_value()?,
            }
            match self.next_token()? {
                b',' => continue,
                b'}' => return Some(d),
                _ => return None,
            }
        }
    }

    /// Steps over one value: a literal or a number, a string, or a
    /// bracketed value with the strings inside it skipped whole.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_ws();
        let first = *self.0.first()?;
        if !matches!(first, b'"' | b'{' | b'[') {
            let n = self
                .0
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.'))
                .count();
            self.0 = &self.0[n..];
            return (n > 0).then_some(());
        }
        let mut depth = 0usize;
        loop {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            match b {
                b'"' => self.skip_string_rest()?,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.checked_sub(1)?,
                _ => {}
            }
            if depth == 0 {
                return Some(());
            }
        }
    }

    /// Steps past the closing quote of a string whose opening quote is read.
    fn skip_string_rest(&mut self) -> Option<()> {
        loop {
            let n = memchr::memchr2(b'"', b'\\', self.0)?;
            let escape = self.0[n] == b'\\';
            self.0 = self.0.get(n + 1 + usize::from(escape)..)?;
            if !escape {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_usage_counts_cache_tokens_in_the_prompt() {
        let want = Usage {
            prompt_tokens: Some(10 + 5 + 2),
            completion_tokens: Some(7),
            total_tokens: Some(24),
            cached_tokens: Some(5),
            reasoning_tokens: None,
        };
        let body = br#"{"type":"message","content":[],"usage":{"input_tokens":10,"cache_read_input_tokens":5,"cache_creation_input_tokens":2,"output_tokens":7}}"#;
        assert_eq!(usage_in_whole_json(body).unwrap(), Some(want));
        let spaced = br#"{"usage": {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5, "service_tier": {"x": 1}}, "id": "m"}"#;
        assert_eq!(usage_in_whole_json(spaced).unwrap(), Some(want));
        let v: Value = serde_json::from_slice(&body[..]).unwrap();
        assert_eq!(Usage::from_json(&v["usage"]), Some(want));
        // No cache fields: nothing added.
        let plain = br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(
            usage_in_whole_json(plain).unwrap().unwrap().prompt_tokens,
            Some(3)
        );
    }

    #[test]
    fn anthropic_stream_usage_joins_message_start_and_message_delta_byte_for_byte() {
        let events = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let mut f = SseFilter::new(false, None);
        let mut out = VecDeque::new();
        let bytes = Bytes::from_static(events.as_bytes());
        for piece in bytes.chunks(7) {
            f.push(Bytes::copy_from_slice(piece), &mut out);
        }
        f.finish(&mut out);
        let relayed: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(relayed, events.as_bytes());
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: Some(14),
                completion_tokens: Some(15),
                total_tokens: Some(29),
                cached_tokens: Some(4),
                reasoning_tokens: None,
            })
        );
    }

    #[test]
    fn the_last_usage_key_is_found_from_its_g() {
        for (hay, want) in [
            (&b"\"usage\""[..], Some(0)),
            (b"{\"usage\":1,\"usage\":2}", Some(11)),
            (b"gggg\"usage\"ggg", Some(4)),
            (b"\"usag\"usage", None),
            (b"usage\"", None),
            (b"\"usage", None),
            (b"g", None),
            (b"", None),
        ] {
            assert_eq!(
                rfind_usage_key(hay),
                memmem::rfind(hay, b"\"usage\""),
                "{}",
                String::from_utf8_lossy(hay)
            );
            assert_eq!(rfind_usage_key(hay), want);
        }
    }

    /// The usage object read by hand agrees with serde's reading wherever
    /// it answers, answers for the shapes upstreams send, and leaves the
    /// rest (negative, fractional, huge counts, escaped or repeated keys)
    /// to serde.
    #[test]
    fn plain_usage_reading_agrees_with_serde() {
        let serde_reading = |json: &str| {
            serde_json::Deserializer::from_str(json)
                .into_iter::<UsageSlot>()
                .next()
                .and_then(Result::ok)
                .and_then(|s| s.0)
        };
        let values = [
            "0",
            "7",
            "18446744073709551615",
            "18446744073709551616",
            "-3",
            "-0",
            "1.0",
            "2e3",
            "null",
            "true",
            "false",
            "\"12\"",
            "\"a\\\"}\"",
            "[]",
            "[1, {\"x\": [2]}]",
            "{}",
            "{\"cached_tokens\": 3, \"audio_tokens\": 0}",
            "{\"a\": \"}\\\\\"}",
        ];
        let keys = [
            "prompt_tokens",
            "input_tokens",
            "completion_tokens",
            "output_tokens",
            "total_tokens",
            "prompt_tokens_details",
            "other",
            "prompt\\u005ftokens",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut answered = 0;
        for _ in 0..20_000 {
            let n = rng.usize(0..6);
            let ws = |rng: &mut fastrand::Rng| [" ", "", "\n ", "\t"][rng.usize(0..4)];
            let members: Vec<String> = (0..n)
                .map(|_| {
                    let (k, v) = (
                        keys[rng.usize(0..keys.len())],
                        values[rng.usize(0..values.len())],
                    );
                    format!(
                        "{}\"{k}\"{}:{}{v}{}",
                        ws(&mut rng),
                        ws(&mut rng),
                        ws(&mut rng),
                        ws(&mut rng)
                    )
                })
                .collect();
            let json = format!("{{{}}}, \"x\": 1}}", members.join(","));
            if let Some(fields) = plain_usage_fields(json.as_bytes()).map(|(f, _)| f) {
                answered += 1;
                assert_eq!(Some(fields.usage()), serde_reading(&json), "{json}");
            }
        }
        assert!(answered > 5_000, "answered {answered}");
        let openai = br#" {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0}}"#;
        let u = plain_usage_fields(openai).unwrap().0.usage();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (Some(19), Some(10), Some(29))
        );
        let huge = br#"{"prompt_tokens": 18446744073709551615, "completion_tokens": 2}"#;
        assert_eq!(
            plain_usage_fields(huge).unwrap().0.usage().total_tokens,
            Some(u64::MAX)
        );
        for other in [
            &b"null"[..],
            b"[1]",
            b"{\"total_tokens\": 05}",
            b"{\"prompt_tokens\": -1}",
            b"{\"prompt_tokens\" 1}",
        ] {
            assert!(plain_usage_fields(other).is_none());
        }
    }

    fn run(filter: &mut SseFilter, chunks: &[&str]) -> String {
        let mut out = VecDeque::new();
        for c in chunks {
            filter.push(Bytes::from(c.to_string()), &mut out);
        }
        filter.finish(&mut out);
        out.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    const STREAM: &[&str] = &[
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[test]
    fn untouched_stream_passes_byte_for_byte_and_usage_is_read() {
        let mut f = SseFilter::new(false, None);
        assert_eq!(run(&mut f, STREAM), STREAM.concat());
        assert_eq!(f.usage.unwrap().total_tokens, Some(4));
    }

    #[test]
    fn requested_usage_chunk_is_removed_when_the_caller_did_not_ask() {
        let mut f = SseFilter::new(true, None);
        let out = run(&mut f, STREAM);
        assert!(!out.contains("usage"), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(f.usage.unwrap().prompt_tokens, Some(3));
    }

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let whole = STREAM.concat();
        let pieces: Vec<&str> = (0..whole.len())
            .step_by(7)
            .map(|i| &whole[i..(i + 7).min(whole.len())])
            .collect();
        let mut f = SseFilter::new(true, Some(("<think>".into(), PrefixSlot::Chat)));
        let out = run(&mut f, &pieces);
        assert!(out.contains("\"content\":\"<think>\""), "{out}");
        assert_eq!(out.matches("<think>").count(), 1);
        assert!(!out.contains("usage"));
        assert_eq!(f.usage.unwrap().completion_tokens, Some(1));
    }

    #[test]
    fn usage_is_found_in_whole_and_truncated_bodies() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        assert_eq!(
            usage_in_whole_json(body).unwrap().unwrap().total_tokens,
            Some(12)
        );
        assert_eq!(
            usage_in_json_tail(&body[20..]).unwrap().completion_tokens,
            Some(7)
        );
        let responses = br#"{"response":{"usage":{"input_tokens":2,"output_tokens":3}}}"#;
        assert_eq!(
            usage_in_whole_json(responses)
                .unwrap()
                .unwrap()
                .total_tokens,
            Some(5)
        );
        assert!(usage_in_whole_json(b"not json").is_err());
        assert_eq!(usage_in_whole_json(b"{\"id\":1}").unwrap(), None);
    }

    /// The typed reader of whole bodies and tails reads what
    /// `Usage::from_json` reads from the same object, odd values included.
    #[test]
    fn typed_usage_reader_agrees_with_the_tree_reader() {
        let objects = [
            r#"{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}"#,
            r#"{"input_tokens":2,"output_tokens":3,"details":[1,{"a":null}]}"#,
            r#"{"prompt_tokens":"3","completion_tokens":2.0,"total_tokens":-1}"#,
            r#"{"prompt_tokens":1,"completion_tokens":null,"prompt_tokens_details":{"cached_tokens":1}}"#,
            r#"{"prompt_tokens":1,"input_tokens":9,"completion_tokens":2}"#,
            r#"{"prompt_tokens":null,"input_tokens":4,"completion_tokens":"x","output_tokens":6}"#,
            r#"{"total_tokens":true,"prompt_tokens":[1],"completion_tokens":{"n":1}}"#,
            r#"{}"#,
            r#""a string""#,
            r#"[1,2]"#,
            r#"7"#,
        ];
        for obj in objects {
            let tree: Value = serde_json::from_str(obj).unwrap();
            let expected = Usage::from_json(&tree);
            let body = format!(r#"{{"id":"x","choices":[{{"text":"\"usage\""}}],"usage":{obj}}}"#);
            assert_eq!(
                usage_in_whole_json(body.as_bytes()).unwrap(),
                expected,
                "{obj}"
            );
            assert_eq!(usage_in_json_tail(body.as_bytes()), expected, "{obj}");
        }
    }

    /// Whole bodies read from the end agree with the full parse on every
    /// JSON object generated: usage first, last, nested, inside strings,
    /// null, odd values, or followed by plain or bracketed members; and the
    /// end reading answers for the common shapes.
    #[test]
    fn whole_body_reading_agrees_with_the_full_parse() {
        fn full_parse(body: &[u8]) -> Option<Usage> {
            let doc: WithUsage = serde_json::from_slice(body).unwrap();
            doc.usage
                .and_then(|u| u.0)
                .or_else(|| doc.response.and_then(|r| r.usage).and_then(|u| u.0))
        }
        fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
            from[rng.usize(..from.len())]
        }
        fn usage(rng: &mut fastrand::Rng) -> String {
            let keys = [
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "input_tokens",
                "output_tokens",
                "prompt_tokens_details",
            ];
            let values = [
                "0",
                "7",
                "123",
                "null",
                "-1",
                "1.5",
                "\"3\"",
                "{\"cached_tokens\":2}",
                "[]",
            ];
            let mut members = Vec::new();
            for k in keys {
                if rng.bool() {
                    let v = if rng.u8(..4) == 0 {
                        pick(rng, &values)
                    } else {
                        pick(rng, &values[..3])
                    };
                    members.push(format!("\"{k}\":{v}"));
                }
            }
            format!("{{{}}}", members.join(","))
        }
        fn value(rng: &mut fastrand::Rng, depth: u32) -> String {
            let strings = [
                "\"x\"",
                "\"usage\"",
                "\"say \\\"usage\\\":{\\\"prompt_tokens\\\":9}\"",
                "\"}\"",
                "\"a\\\\\"",
                "\"fp_1\"",
            ];
            match rng.u8(..if depth > 2 { 3 } else { 6 }) {
                0 => pick(rng, &strings).to_owned(),
                1 => pick(rng, &["1", "-2.5", "true", "null"]).to_owned(),
                2 => pick(rng, &strings).to_owned(),
                3 => {
                    let n = rng.usize(..3);
                    let items: Vec<String> = (0..n).map(|_| value(rng, depth + 1)).collect();
                    format!("[{}]", items.join(","))
                }
                4 => format!("{{\"usage\":{}}}", usage(rng)),
                _ => {
                    let n = rng.usize(..3);
                    let members: Vec<String> = (0..n)
                        .map(|i| format!("\"k{i}\":{}", value(rng, depth + 1)))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }
            }
        }
        let mut rng = fastrand::Rng::with_seed(29);
        let mut answered = 0;
        let docs = 20_000;
        for _ in 0..docs {
            let mut members: Vec<String> = (0..rng.usize(..5))
                .map(|i| format!("\"m{i}\":{}", value(&mut rng, 0)))
                .collect();
            if rng.u8(..4) != 0 {
                let v = if rng.u8(..8) == 0 {
                    "null".to_owned()
                } else {
                    usage(&mut rng)
                };
                let at = if rng.bool() {
                    members.len()
                } else {
                    rng.usize(..=members.len())
                };
                members.insert(at, format!("\"usage\":{v}"));
            }
            if rng.u8(..6) == 0 {
                let at = rng.usize(..=members.len());
                members.insert(
                    at,
                    format!("\"response\":{{\"usage\":{}}}", usage(&mut rng)),
                );
            }
            if rng.bool() {
                members.push("\"service_tier\":\"default\"".to_owned());
                members.push("\"system_fingerprint\":\"fp_1\"".to_owned());
            }
            let sep = pick(&mut rng, &[",", ", ", ",\n  "]);
            let body = format!(
                "{}{{{}}}{}",
                pick(&mut rng, &["", " "]),
                members.join(sep),
                pick(&mut rng, &["", "\n"])
            );
            let want = full_parse(body.as_bytes());
            assert_eq!(
                usage_in_whole_json(body.as_bytes()).unwrap(),
                want,
                "{body}"
            );
            if usage_closing_the_body(body.trim().as_bytes()).is_some() {
                answered += 1;
            }
        }
        assert!(
            answered > docs / 5,
            "the end reading answered {answered} of {docs}"
        );
    }

    #[test]
    fn usage_inside_a_string_is_not_the_usage_key() {
        // The last `"usage"` is text (its quote is escaped): the real key wins.
        let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"text":"say \"usage\":{\"prompt_tokens\":9}"}]}"#;
        let u = usage_in_whole_json(body).unwrap().unwrap();
        assert_eq!((u.prompt_tokens, u.total_tokens), (Some(1), Some(3)));
        // A key that ends in `"usage` (its first quote escaped) is not it.
        let odd_key = br#"{"x\"usage":{"prompt_tokens":1}}"#;
        assert_eq!(usage_in_whole_json(odd_key).unwrap(), None);
        // A cut body that still ends in `}` is not taken for a whole one.
        let cut = br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}"#;
        assert!(usage_in_whole_json(cut).is_err());
        let open_string = br#"{"id":"x}","usage":{"prompt_tokens":1},"t":"}"#;
        assert!(usage_in_whole_json(open_string).is_err());
        let escaped_end = br#"{"t":"a\\","usage":{"prompt_tokens":4}}"#;
        assert_eq!(
            usage_in_whole_json(escaped_end)
                .unwrap()
                .unwrap()
                .prompt_tokens,
            Some(4)
        );
    }
}
