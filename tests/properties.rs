//! Property tests: no input makes the parsers panic, and what they promise
//! holds for generated inputs. Bounded case counts keep CI fast.

use std::collections::VecDeque;
use std::path::Path;

use bytes::Bytes;
use gptbalance::config::env::expand;
use gptbalance::config::load_str;
use gptbalance::proxy::route::{route, Route};
use gptbalance::proxy::sse::{PrefixSlot, SseFilter};
use gptbalance::proxy::transform::peek;
use proptest::prelude::*;

fn cases() -> ProptestConfig {
    ProptestConfig::with_cases(300)
}

fn lookup(name: &str) -> Option<String> {
    (name.len() % 2 == 0).then(|| format!("v-{name}"))
}

/// Config-looking text: fragments of real configs glued at random.
fn config_text() -> impl Strategy<Value = String> {
    let fragments = prop::sample::select(vec![
        "openai_clients:\n", "  - name: a\n", "    base_url: \"http://h/v1\"\n", "    api_key: ${KEY}\n",
        "    api_keys: [a, b, ${X:-y}]\n", "    model_match: { type: exact, value: [m] }\n", "    model_match: { type: regex, value: [\"(\"] }\n",
        "    fallback: m\n", "    fallback: [m, n]\n", "    priority: ${P:-1}\n", "    weight: 0\n", "server:\n", "  listen: \"0.0.0.0:1\"\n",
        "routing:\n", "  cooldown: 5x\n", "  retry_on: [429, 999]\n", "  - { name: b, base_url: \"ftp://x\", api_key: k, model_match: { type: keyword, value: [m] } }\n",
        "\t", ": ", "- ", "[", "{", "}", "]", "\"", "'", "&a ", "*a\n", "!!str ", "---\n", "...\n", "#", "\n",
    ]);
    prop::collection::vec(fragments, 0..30).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn env_expansion_never_panics_and_leaves_plain_text_alone(s in ".{0,64}") {
        let out = expand(&s, &lookup);
        if !s.contains('$') {
            prop_assert_eq!(out.unwrap(), s);
        }
    }

    #[test]
    fn config_loading_never_panics(text in config_text()) {
        match load_str(&text, Path::new("c.yaml"), &lookup) {
            Ok(loaded) => prop_assert!(!loaded.config.clients.is_empty()),
            Err(diags) => prop_assert!(!diags.is_empty()),
        }
    }

    #[test]
    fn config_loading_never_panics_on_any_text(text in "\\PC{0,200}") {
        let _ = load_str(&text, Path::new("c.yaml"), &lookup);
    }

    #[test]
    fn peek_never_panics_and_reads_any_model(bytes in prop::collection::vec(any::<u8>(), 0..256), model in "[a-zA-Z0-9./:_-]{1,40}", extra in "[a-z]{0,10}") {
        let _ = peek(&bytes);
        let body = serde_json::json!({"messages": [{"role": "user", "content": extra}], "model": model, "stream": true});
        let p = peek(body.to_string().as_bytes()).unwrap();
        prop_assert_eq!(p.model.as_deref(), Some(model.as_str()));
        prop_assert!(p.stream);
    }

    #[test]
    fn sse_relay_is_byte_exact_however_the_stream_is_cut(
        words in prop::collection::vec("[a-z \"\\\\]{0,12}", 1..12),
        cuts in prop::collection::vec(1usize..40, 0..20),
        crlf in any::<bool>(),
    ) {
        let nl = if crlf { "\r\n\r\n" } else { "\n\n" };
        let mut stream = String::new();
        for w in &words {
            let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": w}}]});
            stream.push_str(&format!("data: {chunk}{nl}"));
        }
        stream.push_str(&format!("data: {}{nl}", serde_json::json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})));
        stream.push_str(&format!("data: [DONE]{nl}"));
        let bytes = stream.as_bytes();
        // Cut the stream into pieces at the generated points.
        let mut pieces = Vec::new();
        let mut at = 0;
        for c in cuts {
            let end = (at + c).min(bytes.len());
            pieces.push(Bytes::copy_from_slice(&bytes[at..end]));
            at = end;
        }
        pieces.push(Bytes::copy_from_slice(&bytes[at..]));

        let run = |f: &mut SseFilter| -> Vec<u8> {
            let mut out = VecDeque::new();
            for p in &pieces {
                f.push(p.clone(), &mut out);
            }
            f.finish(&mut out);
            out.into_iter().flat_map(|b| b.to_vec()).collect()
        };
        let mut keep = SseFilter::new(false, None);
        prop_assert_eq!(run(&mut keep), bytes.to_vec());
        prop_assert_eq!(keep.usage.unwrap().total_tokens, Some(3));

        let mut drop = SseFilter::new(true, Some(("P>".into(), PrefixSlot::Chat)));
        let out = String::from_utf8(run(&mut drop)).unwrap();
        prop_assert!(!out.contains("\"usage\""));
        let done = format!("data: [DONE]{}", nl);
        prop_assert!(out.ends_with(&done));
        prop_assert_eq!(out.matches("P>").count(), 1);
    }

    #[test]
    fn sse_filter_never_panics_on_garbage(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..10)) {
        let mut f = SseFilter::new(true, Some(("x".into(), PrefixSlot::Completion)));
        let mut out = VecDeque::new();
        for c in chunks {
            f.push(Bytes::from(c), &mut out);
        }
        f.finish(&mut out);
    }

    #[test]
    fn routed_endpoints_never_escape_the_base_url(path in "/[a-zA-Z0-9%./\\\\_-]{0,40}") {
        if let Route::Proxy { endpoint, .. } = route(&path) {
            let lower = endpoint.to_ascii_lowercase();
            prop_assert!(!endpoint.split('/').any(|s| s == ".." || s == "." || s.is_empty()), "{}", endpoint);
            prop_assert!(!lower.contains("%2f") && !lower.contains("%2e") && !lower.contains("%5c") && !endpoint.contains('\\'));
        }
    }
}

/// JSON values whose object keys are never `usage` (strings may mention it,
/// quotes, backslashes and brackets included).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let text = prop::sample::select(vec![
        "",
        "hi",
        "\"usage\":{\"prompt_tokens\":9}",
        "}",
        "]{[",
        "\\",
        "\\\"",
        "a\"b",
        "usage",
        "\u{e9}\n\t",
    ])
    .prop_map(str::to_owned);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        text.clone().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        let key = prop::sample::select(vec!["id", "choices", "message", "content", "usages", "x"]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..4).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(cases())]

    /// The read-from-the-end path of non-streaming bodies agrees with a
    /// full parse, and a body cut anywhere is never taken for a whole one.
    #[test]
    fn usage_of_whole_bodies_matches_a_full_parse_and_cut_bodies_fail(
        before in prop::collection::vec(("[a-z]{1,6}", json_value()), 0..4),
        usage in prop::option::of(json_value()),
        counts in prop::option::of((0u64..1000, 0u64..1000)),
        after in prop::collection::vec(("[a-z]{1,6}", json_value()), 0..3),
    ) {
        use gptbalance::proxy::sse::{usage_in_whole_json, Usage};
        use serde_json::{json, Map, Value};
        let mut doc = Map::new();
        for (k, v) in before {
            doc.insert(format!("b_{k}"), v);
        }
        let usage = match (counts, usage) {
            (Some((p, c)), _) => Some(json!({"prompt_tokens": p, "completion_tokens": c})),
            (None, u) => u,
        };
        if let Some(u) = &usage {
            doc.insert("usage".to_owned(), u.clone());
        }
        for (k, v) in after {
            doc.insert(format!("a_{k}"), v);
        }
        let body = serde_json::to_vec(&Value::Object(doc)).unwrap();
        let expected = usage.as_ref().and_then(Usage::from_json);
        prop_assert_eq!(usage_in_whole_json(&body).unwrap(), expected);
        for cut in 1..body.len() {
            prop_assert!(usage_in_whole_json(&body[..cut]).is_err(), "cut at {}", cut);
        }
    }
}
