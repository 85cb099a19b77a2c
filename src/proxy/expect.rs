//! The body format a response is expected in, checked as the body is
//! relayed (whole JSON bodies in `relay`, stream events in `sse`). A leaf:
//! it knows the config's `Api` and JSON, nothing of HTTP.

use crate::config::Api;

/// Built once: `memmem::find` builds a searcher on every call, and every
/// OpenAI text answer is searched for this key.
static TYPE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"type\""));

/// The body format a response is expected in, to notice an upstream that
/// answers in the other API's format: such a body is passed on as it came,
/// its usage counted as unknown, and the usage row notes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expect {
    /// No check (endpoints whose bodies vary: embeddings, responses, ...).
    #[default]
    Any,
    /// Anthropic's Messages API.
    Anthropic,
    /// OpenAI's chat/completions and completions.
    OpenAiText,
}

impl Expect {
    /// What a response to `endpoint` from a client of `api` should look like.
    pub fn of(api: Api, text_generation: bool) -> Expect {
        match api {
            Api::Anthropic => Expect::Anthropic,
            Api::OpenAi if text_generation => Expect::OpenAiText,
            Api::OpenAi => Expect::Any,
        }
    }

    /// The usage row's note for a body in the other format.
    pub fn note(self) -> String {
        let (got, wanted) = match self {
            Expect::Anthropic => ("OpenAI's", "Anthropic's"),
            _ => ("Anthropic's", "OpenAI's"),
        };
        format!("upstream answered in {got} format where {wanted} was expected: usage unknown")
    }

    /// Whether a whole JSON body is in the other format. OpenAI answers
    /// pay for a parse only when they hold a `"type"` key at all.
    pub fn foreign_json(self, body: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Top {
            #[serde(rename = "type", default)]
            kind: Option<serde_json::Value>,
            #[serde(default)]
            object: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            choices: Option<serde::de::IgnoredAny>,
        }
        let top = || serde_json::from_slice::<Top>(body).ok();
        match self {
            Expect::Any => false,
            Expect::Anthropic => top().is_some_and(|t| t.object.is_some() || t.choices.is_some()),
            Expect::OpenAiText => {
                TYPE_KEY.find(body).is_some()
                    && top().is_some_and(|t| t.kind.is_some_and(|k| k == "message"))
            }
        }
    }

    /// Whether one parsed stream event is in the other format.
    pub fn foreign_event(self, event: &serde_json::Value) -> bool {
        match self {
            Expect::Any => false,
            Expect::Anthropic => event.get("choices").is_some() || event.get("object").is_some(),
            Expect::OpenAiText => event
                .get("type")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|t| t.starts_with("message_")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_in_the_other_format_are_recognised() {
        let anthropic = br#"{"id":"msg_1","type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":1}}"#;
        let openai = br#"{"id":"c","object":"chat.completion","choices":[{"message":{"tool_calls":[{"type":"function"}]}}],"usage":{"prompt_tokens":1}}"#;
        assert!(Expect::Anthropic.foreign_json(openai));
        assert!(!Expect::Anthropic.foreign_json(anthropic));
        assert!(Expect::OpenAiText.foreign_json(anthropic));
        assert!(!Expect::OpenAiText.foreign_json(openai));
        assert!(!Expect::Any.foreign_json(anthropic));
        let start: serde_json::Value =
            serde_json::json!({"type": "message_start", "message": {"usage": {}}});
        let chunk: serde_json::Value =
            serde_json::json!({"object": "chat.completion.chunk", "choices": [], "usage": {}});
        assert!(Expect::OpenAiText.foreign_event(&start));
        assert!(Expect::Anthropic.foreign_event(&chunk));
        assert!(!Expect::Anthropic.foreign_event(&start));
        assert!(!Expect::OpenAiText.foreign_event(&chunk));
    }
}
