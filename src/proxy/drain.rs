//! The drain signal: `server::run` turns it true when shutdown begins, and
//! every connection, on the fast path or in hyper, stops taking requests.
//!
//! One `watch` channel per worker: the accept loop keeps the sender and
//! waits for all receivers to be dropped (or the grace to end); each
//! connection holds a receiver and waits on [`drained`] between requests.

use tokio::sync::watch;

/// Resolves once the server drains (or is gone). The guard `wait_for`
/// returns is not held across an await: it is not `Send`.
pub(crate) async fn drained(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}
