//! Secrets kept in files: `api_key_file`, `api_keys_file`, `token_file`,
//! `admin_token_file` and `${file:PATH}` inside any scalar.
//!
//! Runs on the parsed YAML tree after `${VAR}` expansion and before the
//! sections are deserialized: each `*_file` key is replaced by the key it
//! stands for (`api_key_file` → `api_key`), so validation sees one shape
//! whichever way a secret was given. Relative paths are taken against
//! `$CREDENTIALS_DIRECTORY` when it is set (systemd's `LoadCredential=`),
//! else against the config file's directory. Files are read on every load,
//! so every reload reads them again; the paths asked for go to
//! `Config::read_files`, which the reload watcher follows. A file's content never reaches a
//! diagnostic: messages name the path and the reason only.

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use super::diags::Diags;
use super::source_map::SourceMap;

/// Where relative secret paths are taken from, and how variables are read.
pub struct SecretDir {
    dir: PathBuf,
    /// Every path `read` was asked for, read or not: the reload watcher
    /// follows them (`Config::read_files`).
    asked: std::cell::RefCell<Vec<PathBuf>>,
}

impl SecretDir {
    /// `$CREDENTIALS_DIRECTORY` when set and not empty, else `config_dir`.
    pub fn new(config_dir: &Path, lookup: &dyn Fn(&str) -> Option<String>) -> SecretDir {
        let dir = lookup("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())
            .map_or_else(|| config_dir.to_path_buf(), PathBuf::from);
        SecretDir {
            dir,
            asked: Default::default(),
        }
    }

    /// The paths `read` was asked for so far, each once.
    pub fn asked(&self) -> Vec<PathBuf> {
        let mut list = self.asked.borrow().clone();
        list.sort();
        list.dedup();
        list
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The file's text with one trailing newline removed, and a warning
    /// when others than its owner may read it. Errors name the path only.
    pub fn read(&self, p: &str) -> Result<(String, Option<String>), String> {
        if p.trim().is_empty() {
            return Err("the secret file path is empty".to_owned());
        }
        let path = self.path(p);
        self.asked.borrow_mut().push(path.clone());
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text)
            .to_owned();
        Ok((text, loose_permissions(&path)))
    }
}

#[cfg(unix)]
fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "secret file {} is readable by group or others (mode {mode:o}): chmod 600 it",
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn loose_permissions(_path: &Path) -> Option<String> {
    None
}

/// Replaces every `*_file` key of the document by the key it stands for.
pub fn resolve(doc: &mut Value, dir: &SecretDir, map: &SourceMap, diags: &mut Diags) {
    let Value::Mapping(top) = doc else { return };
    if let Some(Value::Mapping(server)) = top.get_mut("server") {
        one_secret(server, "server", "admin_token", dir, map, diags);
        if let Some(Value::Sequence(tokens)) = server.get_mut("auth_tokens") {
            for (i, t) in tokens.iter_mut().enumerate() {
                if let Value::Mapping(t) = t {
                    let at = format!("server.auth_tokens[{i}]");
                    one_secret(t, &at, "token", dir, map, diags);
                }
            }
        }
    }
    if let Some(Value::Sequence(callers)) = top.get_mut("callers") {
        for (i, c) in callers.iter_mut().enumerate() {
            if let Value::Mapping(c) = c {
                one_secret(c, &format!("callers[{i}]"), "token", dir, map, diags);
            }
        }
    }
    if let Some(Value::Sequence(clients)) = top.get_mut("openai_clients") {
        for (i, c) in clients.iter_mut().enumerate() {
            if let Value::Mapping(c) = c {
                let at = format!("openai_clients[{i}]");
                one_secret(c, &at, "api_key", dir, map, diags);
                key_list(c, &at, dir, map, diags);
            }
        }
    }
}

/// `{key}_file: PATH` → `{key}: <one line>`.
fn one_secret(
    m: &mut Mapping,
    at: &str,
    key: &str,
    dir: &SecretDir,
    map: &SourceMap,
    diags: &mut Diags,
) {
    let file_key = format!("{key}_file");
    let Some(value) = m.remove(file_key.as_str()) else {
        return;
    };
    let path = format!("{at}.{file_key}");
    let Value::String(p) = value else {
        diags.error_at(map.value(&path), format!("{path}: expected a file path"));
        return;
    };
    if m.contains_key(key) {
        diags.error_at(
            map.key(&path),
            format!("{path}: set `{key}` or `{file_key}`, not both"),
        );
        return;
    }
    match dir.read(&p) {
        Err(e) => diags.error_at(map.value(&path), format!("{path}: {e}")),
        Ok((text, warning)) => {
            if let Some(w) = warning {
                diags.warn_at(map.value(&path), format!("{path}: {w}"));
            }
            if text.contains('\n') {
                diags.error_at(
                    map.value(&path),
                    format!(
                        "{path}: the file holds several lines where one secret is expected{}",
                        if key == "api_key" {
                            " (use api_keys_file for one key a line)"
                        } else {
                            ""
                        }
                    ),
                );
                return;
            }
            m.insert(Value::String(key.to_owned()), Value::String(text));
        }
    }
}

/// `api_keys_file: PATH` → its lines appended to `api_keys` (blank lines
/// and `#` comments skipped).
fn key_list(m: &mut Mapping, at: &str, dir: &SecretDir, map: &SourceMap, diags: &mut Diags) {
    let Some(value) = m.remove("api_keys_file") else {
        return;
    };
    let path = format!("{at}.api_keys_file");
    let Value::String(p) = value else {
        diags.error_at(map.value(&path), format!("{path}: expected a file path"));
        return;
    };
    let (text, warning) = match dir.read(&p) {
        Ok(read) => read,
        Err(e) => return diags.error_at(map.value(&path), format!("{path}: {e}")),
    };
    if let Some(w) = warning {
        diags.warn_at(map.value(&path), format!("{path}: {w}"));
    }
    let keys: Vec<Value> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Value::String(l.to_owned()))
        .collect();
    if keys.is_empty() {
        diags.error_at(map.value(&path), format!("{path}: the file holds no key"));
        return;
    }
    let list = match m.remove("api_keys") {
        None | Some(Value::Null) => keys,
        Some(Value::Sequence(mut listed)) => {
            listed.extend(keys);
            listed
        }
        Some(one) => std::iter::once(one).chain(keys).collect(),
    };
    m.insert(Value::String("api_keys".to_owned()), Value::Sequence(list));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_trimmed_and_relative_paths_use_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "sk-1\n\n").unwrap();
        std::fs::write(dir.path().join("crlf"), "sk-2\r\n").unwrap();
        let creds = dir.path().to_string_lossy().into_owned();
        let lookup = move |n: &str| (n == "CREDENTIALS_DIRECTORY").then(|| creds.clone());
        let d = SecretDir::new(Path::new("/nonexistent"), &lookup);
        assert_eq!(d.read("k").unwrap().0, "sk-1\n");
        assert_eq!(d.read("crlf").unwrap().0, "sk-2");
        let e = d.read("missing").unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let without = SecretDir::new(dir.path(), &|_| None);
        assert_eq!(without.read("crlf").unwrap().0, "sk-2");
    }
}
