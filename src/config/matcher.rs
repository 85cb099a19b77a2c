//! `model_match`: exact, keyword, regex — and the rule that exact wins.
//!
//! The rule belongs to the config: validation asks it which clients a model
//! or a fallback target reaches, and `routing::RoutingTable` asks it the
//! same question per request, so both always agree.

use super::{Api, ClientConfig, MatchKind};

/// Indexes of the clients that are candidates for `model`, in ascending
/// priority (file order among equals). If any client matches `model`
/// exactly, only the exact matches are candidates.
pub fn candidates<C: AsRef<ClientConfig>>(clients: &[C], model: &str) -> Vec<usize> {
    candidates_among(clients, model, |_| true)
}

/// [`candidates`] among the clients that speak `api`: the exact-wins rule
/// applies within them.
pub fn candidates_of<C: AsRef<ClientConfig>>(clients: &[C], api: Api, model: &str) -> Vec<usize> {
    candidates_among(clients, model, |c| c.api == api)
}

fn candidates_among<C: AsRef<ClientConfig>>(
    clients: &[C],
    model: &str,
    eligible: impl Fn(&ClientConfig) -> bool,
) -> Vec<usize> {
    let matching = |exact: bool| -> Vec<usize> {
        clients
            .iter()
            .enumerate()
            .filter(|(_, c)| eligible(c.as_ref()))
            .filter(|(_, c)| {
                let rule = &c.as_ref().model_match;
                (rule.kind == MatchKind::Exact) == exact && rule.matches(model)
            })
            .map(|(i, _)| i)
            .collect()
    };
    let mut found = matching(true);
    if found.is_empty() {
        found = matching(false);
    }
    found.sort_by_key(|&i| (clients[i].as_ref().priority, i));
    found
}

impl AsRef<ClientConfig> for ClientConfig {
    fn as_ref(&self) -> &ClientConfig {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    fn clients(yaml: &str) -> Vec<ClientConfig> {
        load_str(yaml, Path::new("t.yaml"), &|_| None)
            .unwrap()
            .config
            .clients
    }

    #[test]
    fn exact_shadows_keyword_and_regex_matches_whole_name() {
        let c = clients(
            r#"
openai_clients:
  - { name: kw, base_url: "http://a", api_key: k, priority: 1, model_match: { type: keyword, value: ["gpt-4"] } }
  - { name: ex, base_url: "http://a", api_key: k, priority: 5, model_match: { type: exact, value: ["gpt-4o"] } }
  - { name: re, base_url: "http://a", api_key: k, priority: 0, model_match: { type: regex, value: ["gpt-4.*-mini"] } }
"#,
        );
        assert_eq!(candidates(&c, "gpt-4o"), vec![1]);
        assert_eq!(candidates(&c, "gpt-4o-mini"), vec![2, 0]);
        assert_eq!(candidates(&c, "gpt-4-turbo"), vec![0]);
        // The regex must match the whole name, not a part of it.
        assert_eq!(candidates(&c, "my-gpt-4o-mini-x"), vec![0]);
        assert!(candidates(&c, "claude").is_empty());
    }

    #[test]
    fn keyword_is_case_sensitive() {
        let c = clients(
            r#"
openai_clients:
  - { name: kw, base_url: "http://a", api_key: k, model_match: { type: keyword, value: ["GPT"] } }
"#,
        );
        assert!(candidates(&c, "gpt-4").is_empty());
        assert_eq!(candidates(&c, "GPT-4"), vec![0]);
    }
}
