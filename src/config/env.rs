//! `${VAR}` and `${VAR:-default}` expansion inside scalar strings.
//!
//! Runs on the parsed YAML tree, never on the text, so an expansion can add
//! no keys or structure. Variables come through a lookup function so tests
//! need no process environment.

/// Why an expansion failed; the caller adds the location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvError {
    Unset(String),
    Malformed(String),
    /// `${file:PATH}` could not be read; the reason names the path only.
    File(String),
}

impl std::fmt::Display for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvError::Unset(var) => write!(
                f,
                "environment variable `{var}` is not set (use ${{{var}:-default}} to give a default)"
            ),
            EnvError::Malformed(why) | EnvError::File(why) => f.write_str(why),
        }
    }
}

/// Expands every `${...}` in `input`. `$${` stands for a literal `${`.
/// An unset or empty variable takes the `:-` default, as in the shell.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    expand_with_files(input, lookup, &|_| {
        Err("`${file:...}` is not read here".to_owned())
    })
}

/// [`expand`], with `${file:PATH}` replaced by what `files` reads at PATH.
pub fn expand_with_files(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    files: &dyn Fn(&str) -> Result<String, String>,
) -> Result<String, EnvError> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                .ok_or_else(|| EnvError::Malformed(format!("unterminated `${{` in `{input}`")))?;
            let inner = &tail[..end];
            if let Some(file) = inner.strip_prefix("file:") {
                out.push_str(&files(file).map_err(EnvError::File)?);
                rest = &tail[end + 1..];
                continue;
            }
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(EnvError::Malformed(format!(
                    "invalid environment variable name `{name}` in `${{{inner}}}`"
                )));
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) if lookup(name).is_some() => {}
                (None, None) => return Err(EnvError::Unset(name.to_owned())),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_unset_and_defaults() {
        assert_eq!(expand("${KEY}", &env).unwrap(), "sk-1");
        assert_eq!(expand("a-${KEY}-b", &env).unwrap(), "a-sk-1-b");
        assert_eq!(expand("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(expand("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand("${NOPE:-}", &env).unwrap(), "");
        assert_eq!(expand("$${KEY} $5", &env).unwrap(), "${KEY} $5");
        assert_eq!(expand("${NOPE}", &env), Err(EnvError::Unset("NOPE".into())));
        assert!(matches!(expand("${KEY", &env), Err(EnvError::Malformed(_))));
        assert!(matches!(
            expand("${A B}", &env),
            Err(EnvError::Malformed(_))
        ));
    }

    #[test]
    fn file_references_are_read_through_the_reader() {
        let files = |p: &str| match p {
            "key.txt" => Ok("sk-file".to_owned()),
            _ => Err(format!("cannot read secret file {p}")),
        };
        let got = expand_with_files("a-${file:key.txt}-${KEY}", &env, &files);
        assert_eq!(got.unwrap(), "a-sk-file-sk-1");
        assert!(matches!(
            expand_with_files("${file:nope}", &env, &files),
            Err(EnvError::File(m)) if m.contains("nope")
        ));
    }

    #[test]
    fn expansion_result_is_not_expanded_again() {
        let nested = |n: &str| (n == "A").then(|| "${KEY}".to_string());
        assert_eq!(expand("${A}", &nested).unwrap(), "${KEY}");
    }
}
