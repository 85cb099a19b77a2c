//! Server-sent events as they pass: event boundaries, the usage chunk, the
//! first content delta; and `usage` in a whole JSON body.
//!
//! Parses JSON only for the few events that need it (one mentioning
//! `"usage"`, or the first content delta when a prefix is due); every other
//! event is forwarded as the same bytes, without a copy.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
}

impl Usage {
    /// Reads a `usage` object: chat/completions/embeddings names, or the
    /// responses API's `input_tokens` / `output_tokens`.
    pub fn from_json(v: &Value) -> Option<Usage> {
        let obj = v.as_object()?;
        let get = |a: &str, b: &str| obj.get(a).or_else(|| obj.get(b)).and_then(Value::as_u64);
        let u = Usage {
            prompt_tokens: get("prompt_tokens", "input_tokens"),
            completion_tokens: get("completion_tokens", "output_tokens"),
            total_tokens: obj.get("total_tokens").and_then(Value::as_u64),
        };
        let total = u
            .total_tokens
            .or(match (u.prompt_tokens, u.completion_tokens) {
                (Some(p), Some(c)) => Some(p + c),
                _ => None,
            });
        Some(Usage {
            total_tokens: total,
            ..u
        })
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
}

enum Verdict {
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
        }
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
                Verdict::Keep => {}
                Verdict::Drop => {
                    push_slice(&data, emit_from, start, out);
                    emit_from = end;
                }
                Verdict::Replace(bytes) => {
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
                Verdict::Keep => out.push_back(rest),
                Verdict::Drop => {}
                Verdict::Replace(b) => out.push_back(b),
            }
        }
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let mentions_usage = memmem::find(event, b"\"usage\"").is_some()
            && memmem::find(event, b"\"usage\":null").is_none();
        if !mentions_usage && self.prefix.is_none() {
            return Verdict::Keep;
        }
        let Some(mut json) = event_json(event) else {
            return Verdict::Keep;
        };
        if mentions_usage {
            let usage = json
                .get("usage")
                .and_then(Usage::from_json)
                .or_else(|| json.pointer("/response/usage").and_then(Usage::from_json));
            if let Some(u) = usage {
                self.usage = Some(u);
                let no_choices = json
                    .get("choices")
                    .is_none_or(|c| c.as_array().is_some_and(|a| a.is_empty()));
                if self.drop_usage_chunk && no_choices {
                    return Verdict::Drop;
                }
            }
        }
        if let Some((prefix, slot)) = &self.prefix {
            if prepend(&mut json, prefix, *slot, true) {
                self.prefix = None;
                let mut out = Vec::with_capacity(event.len() + 16);
                out.extend_from_slice(b"data: ");
                if serde_json::to_writer(&mut out, &json).is_err() {
                    return Verdict::Keep;
                }
                out.extend_from_slice(b"\n\n");
                return Verdict::Replace(Bytes::from(out));
            }
        }
        Verdict::Keep
    }
}

fn push_slice(data: &Bytes, from: usize, to: usize, out: &mut VecDeque<Bytes>) {
    if from < to {
        out.push_back(data.slice(from..to));
    }
}

/// Length of the first complete event in `buf`, blank line included.
pub fn event_len(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
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
    usage: Option<Value>,
    #[serde(default)]
    response: Option<ResponseWithUsage>,
}

#[derive(serde::Deserialize)]
struct ResponseWithUsage {
    #[serde(default)]
    usage: Option<Value>,
}

/// Reads `usage` (or the responses API's `response.usage`) from a whole JSON
/// body, skipping everything else without building it; Err when the body
/// is not JSON.
pub fn usage_in_whole_json(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    let doc: WithUsage = serde_json::from_slice(body)?;
    let usage = doc.usage.or_else(|| doc.response.and_then(|r| r.usage));
    Ok(usage.as_ref().and_then(Usage::from_json))
}

/// Finds the last `"usage": {...}` in the tail of a body too large to keep.
pub fn usage_in_json_tail(tail: &[u8]) -> Option<Usage> {
    let at = memmem::rfind(tail, b"\"usage\"")?;
    let rest = &tail[at + 7..];
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let v = serde_json::Deserializer::from_slice(rest)
        .into_iter::<Value>()
        .next()?
        .ok()?;
    Usage::from_json(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
