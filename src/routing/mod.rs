//! Which upstream serves a model: the immutable routing table, the candidate
//! order, key selection and key health.
//!
//! Knows no HTTP and parses no YAML: built from a validated `Config`, asked
//! by the proxy for a plan, told by the proxy how each attempt went.

pub mod diff;
pub mod key_health;
pub mod selector;
pub mod table;

// Selection beyond round robin (SPEC §11): sessions kept on one key.
pub mod affinity;

pub use key_health::KeyHealth;
pub use selector::Candidates;
pub use table::{CallerRoute, ClientRoute, KeyAsk, KeyPick, KeyRoute, RoutingTable};
