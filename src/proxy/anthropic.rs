//! Anthropic's Messages API beside OpenAI's: which endpoints are
//! Anthropic's, which clients may serve them, how its callers present
//! their token, and the errors a mismatch gets. Nothing is translated from
//! one format into the other.

use http::HeaderMap;

use super::api_error::{ApiError, ErrorShape};
use super::route::{bearer_token, route, Route};
use crate::config::Api;
use crate::routing::RoutingTable;

/// Built once: `memmem::find` builds a searcher on every call, and every
/// OpenAI text answer is searched for this key.
static TYPE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"type\""));

/// The API an endpoint belongs to: `messages` (and `messages/...`, such as
/// `messages/count_tokens`) is Anthropic's, everything else OpenAI's.
pub fn api_of(endpoint: &str) -> Api {
    if endpoint == "messages" || endpoint.starts_with("messages/") {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

/// Whether `path` is one of Anthropic's endpoints (`/v1/messages`,
/// `/{client}/v1/messages/...`).
pub fn is_anthropic_path(path: &str) -> bool {
    matches!(route(path), Route::Proxy { endpoint, .. } if api_of(endpoint) == Api::Anthropic)
}

/// The error shape of a request on `path`: Anthropic's on its endpoints.
pub fn error_shape(path: &str) -> ErrorShape {
    if is_anthropic_path(path) {
        ErrorShape::Anthropic
    } else {
        ErrorShape::OpenAi
    }
}

/// The caller's token: `Authorization: Bearer`, or on Anthropic's
/// endpoints also `x-api-key` (what Anthropic's SDKs send).
pub fn caller_token<'h>(path: &str, headers: &'h HeaderMap) -> Option<&'h str> {
    bearer_token(headers).or_else(|| {
        if !is_anthropic_path(path) {
            return None;
        }
        let key = headers.get("x-api-key")?.to_str().ok()?.trim();
        (!key.is_empty()).then_some(key)
    })
}

/// The 404 for a model no client of `api` serves, saying when clients of
/// the other API do.
pub fn model_not_found(table: &RoutingTable, api: Api, model: &str) -> ApiError {
    let other = match api {
        Api::OpenAi => Api::Anthropic,
        Api::Anthropic => Api::OpenAi,
    };
    let elsewhere = if table.candidates_of(other, model).is_empty() {
        String::new()
    } else {
        format!(
            " (only `{}` clients do, and formats are not translated)",
            other.as_str()
        )
    };
    match api {
        Api::OpenAi => {
            ApiError::ModelNotFound(format!("no client serves model `{model}`{elsewhere}"))
        }
        Api::Anthropic => ApiError::ModelNotFound(format!(
            "no `anthropic` client serves model `{model}`{elsewhere}"
        )),
    }
}

/// The 400 for `/{client}/v1/{endpoint}` when the client speaks the other API.
pub fn pinned_mismatch(table: &RoutingTable, client: usize, endpoint: &str) -> Option<ApiError> {
    let c = &table.clients[client].cfg;
    let wanted = api_of(endpoint);
    (c.api != wanted).then(|| {
        ApiError::InvalidRequest(format!(
            "client `{}` is an `{}` client and cannot serve /v1/{endpoint}, which needs an `{}` client",
            c.name,
            c.api.as_str(),
            wanted.as_str()
        ))
    })
}

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
