//! The request body: what the proxy reads from it (`model`, `stream`) and
//! the per-client changes made before sending it upstream.
//!
//! The caller's bytes go upstream unchanged unless a change applies; reading
//! `model` skips over the rest of the document without building a tree.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::config::ClientConfig;

/// Longest model name accepted; longer ones are rejected before routing.
pub const MAX_MODEL_LEN: usize = 256;

/// The endpoints whose bodies and responses gptbalance understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    Chat,
    Completion,
    Other,
}

impl EndpointKind {
    pub fn of(endpoint: &str) -> Self {
        match endpoint {
            "chat/completions" => EndpointKind::Chat,
            "completions" => EndpointKind::Completion,
            _ => EndpointKind::Other,
        }
    }

    /// Takes `stop`, `max_tokens` and `stream_options`.
    pub fn is_text_generation(self) -> bool {
        self != EndpointKind::Other
    }
}

/// What the proxy needs from a JSON request body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Peek {
    /// Shared with the usage row (also as its `routed_model` when the
    /// client serves the model under its own name): one copy per request.
    pub model: Option<Arc<str>>,
    pub stream: bool,
    pub include_usage: bool,
    /// The completion cap the request names: `max_completion_tokens`,
    /// else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// The hash of `user` (a string), for affinity; the value is not kept.
    pub user_hash: Option<u64>,
    /// The hash of `prompt_cache_key` (a string), likewise.
    pub prompt_cache_key_hash: Option<u64>,
}

#[derive(Deserialize)]
struct PeekDoc {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(default)]
    prompt_cache_key: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<Value>,
}

/// Reads `model`, `stream` and `stream_options.include_usage`.
/// Err: the body is not a JSON object, or `model` is not a usable string.
/// The usual bodies are read by [`super::peek_json`]; anything it does not
/// fully judge goes through serde_json, whose messages callers see.
pub fn peek(body: &[u8]) -> Result<Peek, String> {
    if let Some(f) = super::peek_json::scan(body) {
        return Ok(Peek {
            model: f.model.map(usable_model).transpose()?,
            stream: f.stream,
            include_usage: f.include_usage,
            max_tokens: f.max_completion_tokens.or(f.max_tokens),
            user_hash: f.user.map(affinity_hash),
            prompt_cache_key_hash: f.prompt_cache_key.map(affinity_hash),
        });
    }
    peek_with_serde(body)
}

fn affinity_hash(v: &str) -> u64 {
    crate::routing::affinity::hash_value(v.as_bytes())
}

pub(crate) fn usable_model(m: &str) -> Result<Arc<str>, String> {
    if m.is_empty() {
        return Err("`model` is empty".to_owned());
    }
    if m.len() > MAX_MODEL_LEN {
        return Err(format!("`model` is longer than {MAX_MODEL_LEN} bytes"));
    }
    Ok(Arc::from(m))
}

fn peek_with_serde(body: &[u8]) -> Result<Peek, String> {
    let not_json = |e: serde_json::Error| format!("the request body is not valid JSON: {e}");
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Broken JSON gets the same answer whatever its first byte.
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
        return Err("the request body must be a JSON object".to_owned());
    }
    let doc: PeekDoc = serde_json::from_slice(body).map_err(not_json)?;
    let model = match doc.model {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(usable_model(&m)?),
        Some(_) => return Err("`model` must be a string".to_owned()),
    };
    Ok(Peek {
        model,
        stream: doc
            .stream
            .as_ref()
            .and_then(Value::as_bool)
            .unwrap_or(false),
        include_usage: doc
            .stream_options
            .and_then(|o| o.include_usage)
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_tokens: doc
            .max_completion_tokens
            .as_ref()
            .and_then(Value::as_u64)
            .or_else(|| doc.max_tokens.as_ref().and_then(Value::as_u64)),
        user_hash: doc.user.as_ref().and_then(Value::as_str).map(affinity_hash),
        prompt_cache_key_hash: doc
            .prompt_cache_key
            .as_ref()
            .and_then(Value::as_str)
            .map(affinity_hash),
    })
}

/// The caller's body, parsed into a map at most once and only if a change needs it.
pub struct RequestBody {
    pub bytes: Bytes,
    parsed: OnceLock<Option<Map<String, Value>>>,
}

impl RequestBody {
    pub fn new(bytes: Bytes) -> Self {
        RequestBody {
            bytes,
            parsed: OnceLock::new(),
        }
    }

    fn map(&self) -> Option<&Map<String, Value>> {
        self.parsed
            .get_or_init(|| serde_json::from_slice(&self.bytes).ok())
            .as_ref()
    }
}

/// The changes for one attempt.
pub struct Changes<'a> {
    /// Model name to send, when it differs from the caller's.
    pub model: Option<&'a str>,
    /// Ask for the final usage chunk of a stream.
    pub include_usage: bool,
}

/// The body to send to `client`: the caller's bytes when nothing changes.
pub fn upstream_body<'a>(
    body: &'a RequestBody,
    client: &ClientConfig,
    kind: EndpointKind,
    changes: &Changes,
) -> Cow<'a, Bytes> {
    let text = kind.is_text_generation();
    let client_fields = !client.extra_body.is_empty()
        || (text && (client.stop.is_some() || client.max_tokens.is_some()));
    if changes.model.is_none() && !changes.include_usage && !client_fields {
        return Cow::Borrowed(&body.bytes);
    }
    let Some(map) = body.map() else {
        return Cow::Borrowed(&body.bytes);
    };
    let mut set: Vec<(&str, Value)> = Vec::new();
    if let Some(m) = changes.model {
        set.push(("model", Value::String(m.to_owned())));
    }
    if changes.include_usage && text {
        let mut opts = map
            .get("stream_options")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        opts.insert("include_usage".to_owned(), Value::Bool(true));
        set.push(("stream_options", Value::Object(opts)));
    }
    if text {
        if let Some(stop) = &client.stop {
            if !map.contains_key("stop") {
                set.push(("stop", Value::from(stop.clone())));
            }
        }
        if let Some(max) = client.max_tokens {
            if !map.contains_key("max_tokens") && !map.contains_key("max_completion_tokens") {
                set.push(("max_tokens", Value::from(max)));
            }
        }
    }
    for (k, v) in &client.extra_body {
        if !map.contains_key(k) && !set.iter().any(|(s, _)| s == k) {
            set.push((k.as_str(), v.clone()));
        }
    }
    if set.is_empty() {
        return Cow::Borrowed(&body.bytes);
    }
    match serde_json::to_vec(&Merged {
        base: map,
        set: &set,
    }) {
        Ok(v) => Cow::Owned(Bytes::from(v)),
        Err(_) => Cow::Borrowed(&body.bytes),
    }
}

/// Serializes `base` with the keys in `set` replaced or appended, without
/// cloning `base`.
struct Merged<'a> {
    base: &'a Map<String, Value>,
    set: &'a [(&'a str, Value)],
}

impl Serialize for Merged<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let replaced = |k: &str| self.set.iter().find(|(s, _)| *s == k).map(|(_, v)| v);
        let existing = self
            .base
            .iter()
            .map(|(k, v)| (k.as_str(), replaced(k).unwrap_or(v)));
        let added = self
            .set
            .iter()
            .filter(|(k, _)| !self.base.contains_key(*k))
            .map(|(k, v)| (*k, v));
        s.collect_map(existing.chain(added))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    #[test]
    fn peek_reads_model_and_stream_and_rejects_bad_bodies() {
        let p = peek(br#"{"messages":[{"role":"user","content":"x"}],"model":"gpt-4","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(p.model.as_deref(), Some("gpt-4"));
        assert!(p.stream && p.include_usage);
        assert_eq!(peek(b"{}").unwrap().model, None);
        assert!(peek(b"[\"gpt-4\"]").is_err());
        assert!(peek(b"{\"model\": 5}").is_err());
        for broken in [&b"not json"[..], b"{bad", b"", b"[1,"] {
            let e = peek(broken).err().unwrap();
            assert!(e.starts_with("the request body is not valid JSON: "), "{e}");
        }
        for not_object in [&b"[1]"[..], b" \"gpt-4\"", b"5"] {
            let e = peek(not_object).err().unwrap();
            assert_eq!(e, "the request body must be a JSON object");
        }
        let huge = format!("{{\"model\":\"{}\"}}", "m".repeat(MAX_MODEL_LEN + 1));
        assert!(peek(huge.as_bytes()).is_err());
    }

    /// Bodies of arbitrary shape, many of them broken: whenever the fast
    /// reader answers, the answer (fields, or the error about `model`) is
    /// the one serde_json gives.
    #[test]
    fn the_fast_reader_never_disagrees_with_serde() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        // JSON-like documents: keys from the few that matter (so they
        // repeat), strings with raw control bytes, escapes and surrogates,
        // numbers valid and not, nested to a few levels.
        let piece = prop_oneof![
            Just("a"),
            Just("é"),
            Just(" "),
            Just("\u{1}"),
            Just("\n"),
            Just("\\n"),
            Just("\\\""),
            Just("\\u00e9"),
            Just("\\ud83d\\ude00"),
            Just("\\ud800"),
            Just("\\x"),
            // Runs long enough for the scanner's eight-byte steps.
            Just("the quick brown fox "),
            Just("\u{7f}\u{ff}\u{20ac} tail"),
        ];
        let string =
            proptest::collection::vec(piece, 0..8).prop_map(|p| format!("\"{}\"", p.concat()));
        let number = prop_oneof![
            Just("0"),
            Just("-12"),
            Just("3.25"),
            Just("1e400"),
            Just("2E3"),
            Just("01"),
            Just("-"),
            Just("1."),
            Just("123456789012345678901234567890"),
        ]
        .prop_map(str::to_owned);
        let leaf = prop_oneof![
            string.clone(),
            number,
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("null".to_owned()),
            Just(r#"{"include_usage":true,"include_usage":false}"#.to_owned()),
        ];
        let key = prop_oneof![
            Just("\"model\"".to_owned()),
            Just("\"stream\"".to_owned()),
            Just("\"stream_options\"".to_owned()),
            Just("\"include_usage\"".to_owned()),
            Just("\"max_tokens\"".to_owned()),
            Just("\"max_completion_tokens\"".to_owned()),
            Just("\"user\"".to_owned()),
            Just("\"prompt_cache_key\"".to_owned()),
            Just("\"messages\"".to_owned()),
            Just("\"mod\\u0065l\"".to_owned()),
            string,
        ];
        let value = leaf.prop_recursive(4, 24, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((key.clone(), inner), 0..4).prop_map(|m| {
                    let m: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", m.join(", "))
                }),
            ]
        });
        let noise = prop_oneof![
            Just(""),
            Just(""),
            Just(""),
            Just(","),
            Just("}"),
            Just("\""),
            Just(" "),
            Just("\u{1}"),
            Just("\\"),
        ];
        let body = (value, noise, any::<u16>()).prop_map(|(v, n, at)| {
            let mut text = v;
            let cut = usize::from(at) % (text.len() + 1);
            if text.is_char_boundary(cut) {
                text.insert_str(cut, n);
            }
            text
        });
        let mut runner = TestRunner::new(Config {
            cases: 4000,
            failure_persistence: None,
            ..Config::default()
        });
        let answered = std::cell::Cell::new(0);
        runner
            .run(&body, |text| {
                if crate::proxy::peek_json::scan(text.as_bytes()).is_some() {
                    answered.set(answered.get() + 1);
                    prop_assert_eq!(
                        peek(text.as_bytes()),
                        peek_with_serde(text.as_bytes()),
                        "{}",
                        text
                    );
                }
                Ok(())
            })
            .unwrap();
        // The fast path answers for a fair share of the bodies (about a
        // tenth: most are broken on purpose).
        assert!(answered.get() > 200, "{}", answered.get());
    }

    #[test]
    fn every_byte_that_matters_in_a_long_string_is_seen_at_every_offset() {
        // The scanner steps over string bytes eight at a time; a quote,
        // backslash or control byte must stop it wherever it falls.
        let specials: Vec<u8> = (0u8..0x20).chain([b'"', b'\\']).collect();
        for at in 0..40 {
            for &b in &specials {
                let mut content = vec![b'a'; 40];
                content[at] = b;
                for key in ["model", "messages"] {
                    let mut body = format!("{{\"{key}\":\"").into_bytes();
                    body.extend_from_slice(&content);
                    body.extend_from_slice(b"\"}");
                    let fast = crate::proxy::peek_json::scan(&body);
                    let serde = peek_with_serde(&body);
                    match (fast, serde) {
                        (Some(f), Ok(p)) => assert_eq!(f.model, p.model.as_deref()),
                        // Left to serde_json: whatever it says stands.
                        (None, _) => {}
                        (Some(_), Err(e)) => panic!("accepted what serde refuses ({e}): {body:?}"),
                    }
                    // A control byte is never valid inside a string.
                    if b < 0x20 {
                        assert!(peek(&body).is_err(), "{body:?}");
                    }
                }
            }
            // A string that ends at any offset, then another member: the
            // fast path answers, and its model ends where the string does.
            let model = "m".repeat(at);
            let body = format!(
                r#"{{"model":"{model}","messages":"{}","stream":true}}"#,
                "a".repeat(40 - at)
            );
            let fast = crate::proxy::peek_json::scan(body.as_bytes()).expect("fast path");
            assert_eq!(
                (fast.model, fast.stream),
                (Some(model.as_str()), true),
                "{body}"
            );
            // An escape at any offset of a long value is checked.
            let body = format!(
                r#"{{"messages":"{}\n{}","model":"m"}}"#,
                "a".repeat(at),
                "a".repeat(40 - at)
            );
            assert_eq!(
                crate::proxy::peek_json::scan(body.as_bytes()).map(|f| f.model),
                Some(Some("m")),
                "{body}"
            );
        }
    }

    #[test]
    fn duplicate_fields_are_left_to_serde_which_refuses_them() {
        for body in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"model":"a","stream":true,"stream":false}"#,
            br#"{"model":"a","stream_options":null,"stream_options":{}}"#,
            br#"{"model":"a","stream_options":{"include_usage":true,"include_usage":true}}"#,
            br#"{"model":"a","user":"u","user":"v"}"#,
            br#"{"model":"a","prompt_cache_key":"k","prompt_cache_key":null}"#,
        ] {
            assert_eq!(crate::proxy::peek_json::scan(body), None);
            assert!(peek(body).unwrap_err().contains("duplicate field"));
        }
    }

    #[test]
    fn usual_bodies_take_the_fast_path() {
        for body in [
            &br#"{"model":"bench-model","messages":[{"role":"user","content":"hello"}]}"#[..],
            br#"{"messages":[{"role":"system","content":"Be brief.\nOK"},{"role":"user","content":"caf\u00e9 \"x\""}],"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"max_tokens":100}"#,
            " { \"model\" : \"m\" , \"input\" : [ 1 , 2.5 , -3 ] } \n".as_bytes(),
            br#"{"model":"m","user":"alice","prompt_cache_key":"conv-7","messages":[]}"#,
            br#"{"model":"m","user":42,"prompt_cache_key":null}"#,
        ] {
            let fast = crate::proxy::peek_json::scan(body).expect("fast path");
            let slow = peek_with_serde(body).unwrap();
            assert_eq!(fast.model, slow.model.as_deref());
            assert_eq!((fast.stream, fast.include_usage), (slow.stream, slow.include_usage));
            assert_eq!(
                fast.max_completion_tokens.or(fast.max_tokens),
                slow.max_tokens
            );
            assert_eq!(fast.user.map(affinity_hash), slow.user_hash);
            assert_eq!(
                fast.prompt_cache_key.map(affinity_hash),
                slow.prompt_cache_key_hash
            );
        }
        let p = peek(br#"{"model":"m","user":"alice","prompt_cache_key":"conv-7"}"#).unwrap();
        assert_eq!(p.user_hash, Some(affinity_hash("alice")));
        assert_eq!(p.prompt_cache_key_hash, Some(affinity_hash("conv-7")));
        // An escaped value is decoded before it is hashed.
        let p = peek(br#"{"model":"m","user":"al\u0069ce"}"#).unwrap();
        assert_eq!(p.user_hash, Some(affinity_hash("alice")));
    }

    fn client(extra: &str) -> ClientConfig {
        let yaml = format!(
            "openai_clients:\n  - name: a\n    base_url: http://h\n    api_key: k\n    model_match: {{ type: exact, value: [m] }}\n{extra}"
        );
        load_str(&yaml, Path::new("t.yaml"), &|_| None)
            .unwrap()
            .config
            .clients
            .remove(0)
    }

    #[test]
    fn untouched_bodies_are_the_callers_bytes() {
        let raw = Bytes::from_static(b"{ \"model\" : \"m\",  \"messages\": [] }");
        let body = RequestBody::new(raw.clone());
        let out = upstream_body(
            &body,
            &client(""),
            EndpointKind::Chat,
            &Changes {
                model: None,
                include_usage: false,
            },
        );
        assert!(
            matches!(out, Cow::Borrowed(b) if *b == raw),
            "passed on as it came"
        );
    }

    #[test]
    fn client_fields_never_override_the_callers() {
        let c = client("    stop: [\"END\"]\n    max_tokens: 100\n    extra_body: { top_k: 5, temperature: 1 }\n");
        let body = RequestBody::new(Bytes::from_static(
            br#"{"model":"m","temperature":0.2,"max_completion_tokens":9}"#,
        ));
        let out = upstream_body(
            &body,
            &c,
            EndpointKind::Chat,
            &Changes {
                model: Some("up"),
                include_usage: true,
            },
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "up");
        assert_eq!(v["temperature"], 0.2);
        assert_eq!(v["top_k"], 5);
        assert_eq!(v["stop"], serde_json::json!(["END"]));
        assert!(v.get("max_tokens").is_none());
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Field order is kept: model stays first.
        assert!(String::from_utf8_lossy(&out).starts_with("{\"model\""));
    }

    #[test]
    fn stop_and_max_tokens_only_apply_to_text_generation() {
        let c = client("    stop: [\"END\"]\n    max_tokens: 100\n");
        let raw = Bytes::from_static(br#"{"model":"m","input":"x"}"#);
        let body = RequestBody::new(raw.clone());
        let out = upstream_body(
            &body,
            &c,
            EndpointKind::Other,
            &Changes {
                model: None,
                include_usage: false,
            },
        );
        assert!(
            matches!(out, Cow::Borrowed(b) if *b == raw),
            "passed on as it came"
        );
    }
}
