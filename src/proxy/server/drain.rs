//! The drain: the accept loop asks every connection to finish its request
//! and close, then waits (up to `shutdown_grace`) until they have.
//!
//! One `watch` channel per worker, named for its two ends: the accept loop
//! keeps the [`DrainSignal`], each connection task holds a [`Drain`] (a
//! receiver) for its life, on the server loop and in hyper alike. Dropping
//! the connection drops its `Drain`; the signal sees when the last one is
//! gone. mini-redis's `shutdown.rs` is the model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// The accept loop's end of the drain.
pub struct DrainSignal {
    tx: watch::Sender<bool>,
    /// What the channel holds, read without its lock: the server loop
    /// asks after every request.
    draining: Arc<AtomicBool>,
}

/// A connection's end of the drain: whether the server is draining, and a
/// future that resolves when it starts.
#[derive(Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
    draining: Arc<AtomicBool>,
}

impl DrainSignal {
    /// A signal not yet given, and the first connection end to clone.
    pub fn new() -> (DrainSignal, Drain) {
        let (tx, rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        (
            DrainSignal {
                tx,
                draining: draining.clone(),
            },
            Drain { rx, draining },
        )
    }

    /// Asks every connection to finish its request and close.
    pub fn start(&self) {
        // Set before the channel wakes anyone: a connection woken by
        // `started` finds it set.
        self.draining.store(true, Ordering::Release);
        let _ = self.tx.send(true);
    }

    /// Connections still open (each holds a `Drain`).
    pub fn open_connections(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Resolves once every connection's `Drain` is dropped.
    pub async fn all_closed(&self) {
        self.tx.closed().await
    }
}

impl Drain {
    /// Whether the drain has started: a connection about to wait for its
    /// next request closes instead.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves once the drain starts (or the signal is gone). The guard
    /// `wait_for` returns is not held across an await: it is not `Send`.
    pub async fn started(&mut self) {
        let _ = self.rx.wait_for(|d| *d).await;
    }
}
