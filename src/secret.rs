//! Secrets (upstream keys, caller tokens) and their redacted ids.
//!
//! A [`Secret`] has no `Display` and a redacting `Debug`, so it cannot reach a
//! log line or an error by accident; everything outside the upstream request
//! builder sees only a [`KeyId`].

use std::fmt;
use std::sync::Arc;

use ring::digest::{digest, SHA256};

/// A key or token. Only [`Secret::expose`] reveals it, for the one place that must.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The raw value; call only where it is sent upstream or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(self.expose())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.key_id())
    }
}

/// A stable, non-reversible id for a key: `key-` and 8 hex digits of its SHA-256.
///
/// Stable across restarts and reloads, so usage rows and metrics of one key
/// line up; 32 bits of a hash reveal nothing usable about the key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

impl KeyId {
    pub fn of(secret: &str) -> Self {
        KeyId(format!("key-{}", hex8(&sha256(secret.as_bytes()))).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The first 8 hex digits of a digest: 32 bits, which say nothing usable
/// about what was hashed.
fn hex8(hash: &[u8; 32]) -> String {
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The stable name of a bare token: `token-` and 8 hex digits of its
/// SHA-256, the same in usage rows, logs and metrics.
pub fn token_name(token_sha256: &[u8; 32]) -> String {
    format!("token-{}", hex8(token_sha256))
}

/// Compares a presented token with a configured one in time independent of
/// where they differ: both sides are hashed first, so lengths leak nothing either.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let a = digest(&SHA256, presented);
    let b = digest(&SHA256, expected);
    let diff = a
        .as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_is_stable_and_hides_the_key() {
        let id = KeyId::of("sk-very-secret-key");
        assert_eq!(id, KeyId::of("sk-very-secret-key"));
        assert_ne!(id, KeyId::of("sk-other"));
        assert!(id.as_str().starts_with("key-"));
        assert_eq!(id.as_str().len(), 12);
        assert!(!format!("{:?}", Secret::new("sk-very-secret-key")).contains("secret-key"));
    }

    #[test]
    fn constant_time_eq_compares_values() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"token"));
    }
}
