//! read → parse → expand → deserialize each section → validate.
//!
//! Every stage collects all of its problems before giving up, so an operator
//! sees every mistake of a file in one run.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::diags::Diags;
use super::env;
use super::schema::{self, TOP_LEVEL_KEYS};
use super::secret_files;
use super::source_map::{Pos, SourceMap};
use super::validate::{self, Sections};
use super::{Config, Diagnostic, Severity};

/// A config that passed validation, with the warnings it raised.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (exit code 2).
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config (exit code 1).
    #[error("{} error(s) in config file", .0.iter().filter(|d| d.severity == Severity::Error).count())]
    Invalid(Vec<Diagnostic>),
}

/// Loads and validates the config file at `path`, with the process environment.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    load_str(&text, path, &|name| std::env::var(name).ok()).map_err(LoadError::Invalid)
}

/// Validates `text` as if read from `path` (for messages and relative paths),
/// taking variables from `lookup`. On failure returns every diagnostic,
/// warnings included.
pub fn load_str(
    text: &str,
    path: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let mut diags = Diags {
        file: path.display().to_string(),
        list: Vec::new(),
    };
    let map = match SourceMap::build(text) {
        Ok(map) => map,
        Err((pos, msg)) => {
            diags.error_at(pos, format!("invalid YAML: {msg}"));
            return Err(diags.list);
        }
    };
    let mut doc: Value = match serde_yaml::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            let pos = e
                .location()
                .map(|l| Pos {
                    line: l.line(),
                    col: l.column(),
                })
                .unwrap_or(Pos { line: 1, col: 1 });
            diags.error_at(
                pos,
                format!("invalid YAML: {}", strip_location(&e.to_string())),
            );
            return Err(diags.list);
        }
    };
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let secrets = secret_files::SecretDir::new(&base_dir, lookup);
    expand_env(&mut doc, String::new(), lookup, &secrets, &map, &mut diags);
    secret_files::resolve(&mut doc, &secrets, &map, &mut diags);

    let sections = read_sections(doc, &map, &mut diags);
    let config = sections.and_then(|s| validate::validate(s, &base_dir, &map, &mut diags));
    let config = config.map(|mut config| {
        config.read_files = secrets.asked();
        if let Some(tls) = &config.server.tls {
            config
                .read_files
                .extend([tls.cert.clone(), tls.key.clone()]);
        }
        config
    });
    diags.list.sort_by_key(|d| (d.line, d.col));
    match config {
        Some(config) if !diags.has_errors() => Ok(Loaded {
            config,
            warnings: diags.list,
        }),
        _ => Err(diags.list),
    }
}

fn strip_location(msg: &str) -> &str {
    msg.split(" at line ").next().unwrap_or(msg)
}

fn expand_env(
    node: &mut Value,
    path: String,
    lookup: &dyn Fn(&str) -> Option<String>,
    secrets: &secret_files::SecretDir,
    map: &SourceMap,
    diags: &mut Diags,
) {
    match node {
        Value::String(s) => {
            let warnings = std::cell::RefCell::new(Vec::new());
            let files = |p: &str| {
                let (text, warning) = secrets.read(p)?;
                warnings.borrow_mut().extend(warning);
                Ok(text)
            };
            match env::expand_with_files(s, lookup, &files) {
                Ok(expanded) => *s = expanded,
                Err(e) => diags.error_at(map.value(&path), e.to_string()),
            }
            for w in warnings.into_inner() {
                diags.warn_at(map.value(&path), format!("{path}: {w}"));
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, format!("{path}[{i}]"), lookup, secrets, map, diags);
            }
        }
        Value::Mapping(entries) => {
            for (key, value) in entries.iter_mut() {
                let key = key_text(key);
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                expand_env(value, child, lookup, secrets, map, diags);
            }
        }
        Value::Tagged(tagged) => expand_env(&mut tagged.value, path, lookup, secrets, map, diags),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "?".to_owned(),
    }
}

/// Splits the document into its sections and deserializes each on its own;
/// `None` when a section could not be read at all.
fn read_sections(doc: Value, map: &SourceMap, diags: &mut Diags) -> Option<Sections> {
    let entries = match doc {
        Value::Mapping(entries) => entries,
        Value::Null => {
            diags.error_at(
                Pos { line: 1, col: 1 },
                "the config is empty: `openai_clients` is required",
            );
            return None;
        }
        _ => {
            diags.error_at(
                Pos { line: 1, col: 1 },
                "the config must be a mapping of sections",
            );
            return None;
        }
    };
    let mut sections = Sections::default();
    let mut clients = None;
    for (key, value) in entries {
        let key = key_text(&key);
        match key.as_str() {
            "server" => sections.server = optional_section(value, &key, map, diags),
            "routing" => sections.routing = optional_section(value, &key, map, diags),
            "usage" => sections.usage = optional_section(value, &key, map, diags),
            "logging" => sections.logging = optional_section(value, &key, map, diags),
            "prices" => sections.prices = optional_section(value, &key, map, diags),
            "shadow" => match value {
                Value::Sequence(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let path = format!("shadow[{i}]");
                        let entry: Option<schema::ShadowSection> = section(item, &path, map, diags);
                        sections.shadow.push((path, entry));
                    }
                }
                Value::Null => {}
                _ => diags.error_at(map.value("shadow"), "`shadow` must be a list"),
            },
            "shared_state" => {
                sections.shared_state = if value.is_null() {
                    Some(None)
                } else {
                    section(value, &key, map, diags).map(Some)
                }
            }
            "callers" => match value {
                Value::Sequence(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let path = format!("callers[{i}]");
                        let caller: Option<schema::CallerSection> =
                            section(item, &path, map, diags);
                        sections.callers.push((path, caller));
                    }
                }
                Value::Null => {}
                _ => diags.error_at(map.value("callers"), "`callers` must be a list of callers"),
            },
            "openai_clients" => clients = Some(value),
            _ => {
                diags.error_at(map.key(&key), unknown_key_message(&key, TOP_LEVEL_KEYS));
            }
        }
    }
    match clients {
        None => diags.error_at(
            Pos { line: 1, col: 1 },
            "`openai_clients` is required: list at least one upstream client",
        ),
        Some(Value::Sequence(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let path = format!("openai_clients[{i}]");
                let client: Option<schema::ClientSection> = section(item, &path, map, diags);
                sections.clients.push((path, client));
            }
        }
        Some(Value::Null) => {}
        Some(_) => diags.error_at(
            map.value("openai_clients"),
            "`openai_clients` must be a list of clients",
        ),
    }
    Some(sections)
}

/// A section that may be left empty (`server:` with nothing under it).
fn optional_section<T: DeserializeOwned + Default>(
    value: Value,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<T> {
    if value.is_null() {
        return Some(T::default());
    }
    section(value, path, map, diags)
}

/// Deserializes one section, reporting its first problem at its position.
fn section<T: DeserializeOwned>(
    value: Value,
    path: &str,
    map: &SourceMap,
    diags: &mut Diags,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let mut at = if inner == "." {
                path.to_owned()
            } else {
                format!("{path}.{inner}")
            };
            let raw = e.into_inner().to_string();
            match parse_unknown_field(&raw) {
                Some((field, expected)) => {
                    if !at.ends_with(&field) {
                        at = format!("{at}.{field}");
                    }
                    diags.error_at(map.key(&at), unknown_key_message(&field, &expected));
                }
                None => diags.error_at(map.value(&at), format!("{}: {}", at, strip_location(&raw))),
            }
            None
        }
    }
}

/// Reads serde's "unknown field `x`, expected one of `a`, `b`" message.
fn parse_unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((field.to_owned(), expected))
}

pub fn unknown_key_message<S: AsRef<str>>(key: &str, expected: &[S]) -> String {
    match did_you_mean(key, expected.iter().map(AsRef::as_ref)) {
        Some(hint) => format!("unknown key `{key}` (did you mean `{hint}`?)"),
        None => {
            let all: Vec<&str> = expected.iter().map(AsRef::as_ref).collect();
            format!("unknown key `{key}`; expected one of: {}", all.join(", "))
        }
    }
}

/// The candidate closest to `word` by edit distance, if close enough to be
/// a typo. Ties go to the candidate needing fewest insertions and
/// deletions (`api_keyz` is `api_key` with a stray letter rather than
/// `api_keys` with a wrong one), then to the first in order, so the answer
/// never depends on how the candidates are listed.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|&(d, c)| (d, indel_distance(word, c), c))
        .map(|(_, c)| c)
}

/// Edits when only insertions and deletions are allowed: the lengths
/// less twice their longest common subsequence.
fn indel_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev = vec![0usize; b.len() + 1];
    for ca in &a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = if ca == cb {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    a.len() + b.len() - 2 * prev[b.len()]
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(
            did_you_mean("prioirty", ["priority", "weight"]),
            Some("priority")
        );
        assert_eq!(did_you_mean("zzzz", ["priority", "weight"]), None);
        for order in [["api_keys", "api_key"], ["api_key", "api_keys"]] {
            assert_eq!(did_you_mean("api_keyz", order), Some("api_key"));
        }
        assert_eq!(
            did_you_mean("api_key", ["api_keys", "api_key"]),
            Some("api_key")
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn reads_serde_unknown_field_messages() {
        let (f, exp) =
            parse_unknown_field("unknown field `prioirty`, expected one of `name`, `priority`")
                .unwrap();
        assert_eq!(f, "prioirty");
        assert_eq!(exp, vec!["name", "priority"]);
    }
}
