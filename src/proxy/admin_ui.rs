//! The status page (`/admin/ui`) and the usage data it charts
//! (`/admin/usage`).
//!
//! The page is three files compiled into the binary: HTML, a script and a
//! style sheet, served under `Content-Security-Policy: default-src 'self'`
//! (so nothing inline, nothing from another host). They hold no data and
//! are served without the admin token; the script asks for the token (or
//! reads it from the URL fragment, which never reaches the server) and
//! sends it as a bearer token on every call to `/admin/status` and
//! `/admin/usage`. Charts are SVG drawn by the script: no library to
//! vendor, and the whole page stays a few tens of kilobytes.
//!
//! `/admin/usage` reads the month file read-only on the blocking pool,
//! with the same code as `gptbalance usage` (`usage::report`) plus the
//! per-day series of `usage::daily`; a missing, foreign or unreadable file
//! is said in the answer (`note`, `unavailable`), never an error page.

use std::path::Path;
use std::sync::Arc;

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use super::api_error::ApiError;
use super::body::ResponseBody;
use crate::state::AppState;
use crate::usage::report::{self, GroupBy};
use crate::usage::{daily, store};

const INDEX_HTML: &str = include_str!("admin_ui/index.html");
const APP_JS: &str = include_str!("admin_ui/app.js");
const STYLE_CSS: &str = include_str!("admin_ui/style.css");

/// The page and its two assets; `None` for any other `ui/...` path.
pub fn asset(what: &str) -> Option<Response<ResponseBody>> {
    let (body, content_type) = match what {
        "ui" | "ui/" | "ui/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "ui/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "ui/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut resp = Response::new(ResponseBody::full(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(resp)
}

/// `month` and `by` of the query string, checked.
fn parse_query(query: Option<&str>) -> Result<(Option<String>, GroupBy), ApiError> {
    let mut month = None;
    let mut by = GroupBy::Client;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "month" => {
                let b = v.as_bytes();
                let ok = b.len() == 7
                    && b[4] == b'-'
                    && b[..4].iter().all(u8::is_ascii_digit)
                    && v[5..].parse::<u8>().is_ok_and(|m| (1..=12).contains(&m));
                if !ok {
                    return Err(ApiError::InvalidRequest(format!(
                        "month `{v}` is not a month such as 2026-01"
                    )));
                }
                month = Some(v.to_owned());
            }
            "by" => {
                by = match v {
                    "client" => GroupBy::Client,
                    "model" => GroupBy::Model,
                    "key" => GroupBy::Key,
                    "caller" => GroupBy::Caller,
                    _ => {
                        return Err(ApiError::InvalidRequest(format!(
                            "by `{v}` must be client, model, key or caller"
                        )))
                    }
                }
            }
            _ => {}
        }
    }
    Ok((month, by))
}

/// `GET /admin/usage?month=YYYY-MM&by=client|model|key|caller`.
pub async fn usage(state: &Arc<AppState>, query: Option<&str>) -> Result<Value, ApiError> {
    let (month, by) = parse_query(query)?;
    let month = month.unwrap_or_else(|| store::month_of((state.clock)()));
    let usage = state.table.load().config.usage.clone();
    let mut answer = tokio::task::spawn_blocking(move || read_month(&usage.dir, &month, by))
        .await
        .unwrap_or_else(|e| json!({ "unavailable": format!("the usage report failed: {e}") }));
    if !state.table.load().config.usage.enabled {
        if let Some(o) = answer.as_object_mut() {
            o.insert(
                "note".into(),
                json!("usage recording is off (usage.enabled: false)"),
            );
        }
    }
    Ok(answer)
}

fn read_month(dir: &Path, month: &str, by: GroupBy) -> Value {
    let path = store::path_for(dir, month);
    let exists = path.exists();
    let files: Vec<&Path> = if exists { vec![&path] } else { Vec::new() };
    let built =
        report::build(&files, month, by, None).and_then(|r| Ok((r, daily::build(&files, by)?)));
    let (mut answer, unavailable) = match built {
        Ok((report, series)) => {
            let mut v = serde_json::to_value(&report).unwrap_or_else(|_| json!({}));
            if let (Some(o), Ok(Value::Object(s))) =
                (v.as_object_mut(), serde_json::to_value(&series))
            {
                o.extend(s);
            }
            (v, None)
        }
        Err(e) => {
            let empty = report::build(&[], month, by, None).ok();
            let v = serde_json::to_value(&empty).unwrap_or_else(|_| json!({}));
            (v, Some(e.to_string()))
        }
    };
    if let Some(o) = answer.as_object_mut() {
        for k in ["days", "days_by", "latest_errors"] {
            o.entry(k).or_insert_with(|| json!([]));
        }
        if let Some(u) = unavailable {
            o.insert("unavailable".into(), json!(u));
        } else if !exists {
            o.insert(
                "note".into(),
                json!(format!("no usage file for {month} in {}", dir.display())),
            );
        }
    }
    answer
}

/// Marks an admin answer as never to be stored by a browser or proxy.
pub fn no_store(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// 200 with `value` as JSON.
pub fn json_ok(value: &Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(value.to_string()));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    no_store(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_checked() {
        assert!(matches!(parse_query(None), Ok((None, GroupBy::Client))));
        assert!(matches!(
            parse_query(Some("month=2026-02&by=caller")),
            Ok((Some(m), GroupBy::Caller)) if m == "2026-02"
        ));
        for bad in ["month=2026-13", "month=26-01", "by=colour", "month=2026-1x"] {
            assert!(
                matches!(parse_query(Some(bad)), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_asset_carries_the_policy_and_no_store() {
        for what in ["ui", "ui/app.js", "ui/style.css"] {
            let r = asset(what).unwrap();
            assert_eq!(r.headers()["content-security-policy"], "default-src 'self'");
            assert_eq!(r.headers()["cache-control"], "no-store");
        }
        assert!(asset("ui/other.js").is_none());
    }

    #[test]
    fn the_page_has_no_inline_script_style_or_handler() {
        let html = INDEX_HTML.to_ascii_lowercase();
        assert!(!html.contains("<style"), "inline style element");
        assert!(!html.contains("style="), "inline style attribute");
        let handler = regex::Regex::new(r"\son[a-z]+\s*=").unwrap();
        assert!(!handler.is_match(&html), "inline event handler");
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/admin/ui/app.js\""));
        assert!(!APP_JS.contains("setAttribute(\"style\""));
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "another host"
            );
            assert!(
                !text.contains("//cdn") && !text.contains("@import"),
                "another host"
            );
        }
    }
}
