//! `server.keepalive_timeout` on the connections hyper serves (TLS, HTTP/2,
//! and HTTP/1.1 requests the fast path handed over), as the fast path
//! applies it to its own: a connection with no request in flight for that
//! long is shut down gracefully (HTTP/2: GOAWAY; HTTP/1.1: closed between
//! requests).
//!
//! Each request holds a [`Busy`] from the moment hyper hands it to the
//! service until its response body is dropped (sent, failed or cancelled);
//! the last one dropped stamps the time. [`Idle::expired`] sleeps until that
//! stamp plus the timeout and checks again, so an idle connection costs one
//! timer, not a timer per request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// One connection's requests in flight and when the last one ended.
#[derive(Clone)]
pub struct Idle(Arc<State>);

struct State {
    busy: AtomicUsize,
    /// Milliseconds after `start` when the last request ended.
    last: AtomicU64,
    start: Instant,
}

/// Held by a request in flight.
pub struct Busy(Arc<State>);

impl Idle {
    /// A connection that starts idle now.
    pub fn new() -> Idle {
        Idle(Arc::new(State {
            busy: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            start: Instant::now(),
        }))
    }

    /// Marks a request in flight until the returned value is dropped.
    pub fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }

    /// Resolves once no request has been in flight for `after`.
    pub async fn expired(&self, after: Duration) {
        loop {
            // `busy` before `last`: a request that starts after this look is
            // one graceful shutdown lets finish; one that ended is stamped.
            let busy = self.0.busy.load(Ordering::Acquire);
            let last = Duration::from_millis(self.0.last.load(Ordering::Acquire));
            let wake = if busy == 0 {
                let due = self.0.start + last + after;
                if Instant::now() >= due {
                    return;
                }
                due
            } else {
                // A request may end any moment: the earliest the connection
                // can be idle is a whole timeout from now.
                Instant::now() + after
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Default for Idle {
    fn default() -> Self {
        Idle::new()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last.fetch_max(now, Ordering::AcqRel);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_the_last_request_has_been_over_for_the_timeout() {
        let idle = Idle::new();
        let after = Duration::from_secs(10);
        let busy = idle.busy();
        let started = Instant::now();
        let expired = idle.expired(after);
        tokio::pin!(expired);
        // Busy for 25 s: not idle meanwhile.
        tokio::select! {
            _ = &mut expired => panic!("expired with a request in flight"),
            _ = tokio::time::sleep(Duration::from_secs(25)) => {}
        }
        drop(busy);
        expired.await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(35), "{waited:?}");
        assert!(waited <= Duration::from_secs(46), "{waited:?}");
    }
}
