//! Anthropic's Messages API beside OpenAI's: which endpoints are
//! Anthropic's, which clients may serve them, how its callers present
//! their token, and the errors a mismatch gets. Nothing is translated from
//! one format into the other.

use http::HeaderMap;

use super::api_error::{ApiError, ErrorShape};
use super::route::{bearer_token, route, Route};
use crate::config::Api;
use crate::routing::RoutingTable;

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
    // Asked two or three times a request: the usual path, `/v1/` and an
    // endpoint that is not `messages`, is told without being routed.
    if path
        .strip_prefix("/v1/")
        .is_some_and(|endpoint| !endpoint.starts_with("messages"))
    {
        return false;
    }
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
