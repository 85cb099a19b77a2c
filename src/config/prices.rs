//! Prices in USD per million tokens, the `*` globs that name models, and the
//! cost of a request's tokens.
//!
//! Money is counted in whole nano-dollars (`i64`): exact to add and compare,
//! and the form a shared counter can hold. A token at $0.15 per million is
//! 150 nano-dollars; `i64` holds more than nine billion dollars.

use std::collections::HashMap;

/// Nano-dollars per dollar.
pub const NANOS_PER_USD: f64 = 1e9;

/// One model's prices, USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    /// Cached prompt tokens; `input` when the config gives none.
    pub cached_input: f64,
    pub output: f64,
}

/// Token counts a price applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Every prompt token, cached ones included.
    pub prompt: u64,
    /// The part of `prompt` served from the provider's cache.
    pub cached: u64,
    /// Completion tokens, reasoning tokens included.
    pub completion: u64,
}

impl Price {
    /// The cost of `t` in nano-dollars, saturating (an absurd `max_tokens`
    /// never overflows).
    pub fn cost_nanos(&self, t: Tokens) -> i64 {
        let cached = t.cached.min(t.prompt);
        let per_token = |n: u64, usd_per_m: f64| n as f64 * usd_per_m * (NANOS_PER_USD / 1e6);
        let nanos = per_token(t.prompt - cached, self.input)
            + per_token(cached, self.cached_input)
            + per_token(t.completion, self.output);
        if nanos >= i64::MAX as f64 {
            i64::MAX
        } else {
            nanos.round().max(0.0) as i64
        }
    }
}

/// Nano-dollars as dollars, for rows, status and metrics.
pub fn usd(nanos: i64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Prices by model name: an exact name wins, then the longest glob.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    exact: HashMap<String, Price>,
    /// Longest pattern first.
    globs: Vec<(String, Price)>,
}

impl PriceTable {
    pub fn new(entries: impl IntoIterator<Item = (String, Price)>) -> PriceTable {
        let mut t = PriceTable::default();
        for (pattern, price) in entries {
            if pattern.contains('*') {
                t.globs.push((pattern, price));
            } else {
                t.exact.insert(pattern, price);
            }
        }
        t.globs
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        t
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.globs.is_empty()
    }

    /// Every pattern and its price, sorted by pattern.
    pub fn entries(&self) -> Vec<(&str, Price)> {
        let mut all: Vec<(&str, Price)> = self
            .exact
            .iter()
            .map(|(k, p)| (k.as_str(), *p))
            .chain(self.globs.iter().map(|(k, p)| (k.as_str(), *p)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.exact.get(model) {
            return Some(*p);
        }
        self.globs
            .iter()
            .find(|(g, _)| glob_match(g, model))
            .map(|(_, p)| *p)
    }
}

/// `*` matches any run of characters (none included); everything else is
/// literal. Case-sensitive, like model matching.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // Asked per request and candidate when a caller has limits: walked
    // byte by byte in place, nothing allocated, no searcher set up.
    let mut parts = pattern.as_bytes().split(|&b| b == b'*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.as_bytes().strip_prefix(first) else {
        return false;
    };
    let Some(mut part) = parts.next() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    // Each part between stars is found in turn; the last must end the text.
    for next in parts {
        match memchr::memmem::find(rest, part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
        part = next;
    }
    rest.ends_with(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("gpt-4o*", "gpt-4o"));
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(!glob_match("gpt-4o*", "my-gpt-4o"));
        assert!(glob_match("*-mini", "gpt-4o-mini"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("a**b", "ab"));
        assert!(glob_match("*4o*", "gpt-4o-mini"));
        assert!(!glob_match("*x*", "gpt-4o-mini"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
    }

    #[test]
    fn exact_names_win_then_the_longest_glob() {
        let p = |x: f64| Price {
            input: x,
            cached_input: x,
            output: x,
        };
        let t = PriceTable::new([
            ("gpt-*".to_owned(), p(1.0)),
            ("gpt-4o*".to_owned(), p(2.0)),
            ("gpt-4o-mini".to_owned(), p(3.0)),
        ]);
        assert_eq!(t.get("gpt-4o-mini").unwrap().input, 3.0);
        assert_eq!(t.get("gpt-4o-2024").unwrap().input, 2.0);
        assert_eq!(t.get("gpt-3.5").unwrap().input, 1.0);
        assert!(t.get("claude").is_none());
    }

    #[test]
    fn costs_count_cached_tokens_at_their_price_and_saturate() {
        let price = Price {
            input: 0.15,
            cached_input: 0.075,
            output: 0.60,
        };
        let t = Tokens {
            prompt: 1000,
            cached: 400,
            completion: 100,
        };
        // 600 * 0.15 + 400 * 0.075 + 100 * 0.60 = 90 + 30 + 60 = 180 $/M = 180_000 nanos
        assert_eq!(price.cost_nanos(t), 180_000);
        let absurd = Tokens {
            prompt: 0,
            cached: 0,
            completion: 1_000_000_000_000_000_000,
        };
        assert_eq!(price.cost_nanos(absurd), i64::MAX);
        assert!((usd(180_000) - 0.00018).abs() < 1e-12);
    }
}
