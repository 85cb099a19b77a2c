//! Health of one (client, key) pair: consecutive failures, cooldown, counters.
//!
//! Lock-free (atomics only) because every attempt touches it. Shared by
//! `Arc` across routing-table generations, so it survives reloads.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The longest cooldown a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on a process-local monotonic clock; never 0, which means "none".
fn now_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64 + 1
}

#[derive(Debug, Default)]
pub struct KeyHealth {
    consecutive_failures: AtomicU32,
    /// `now_ms()` value at which the cooldown ends; 0 when none ever started.
    cooldown_until: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU32,
}

impl KeyHealth {
    /// Time left in the current cooldown, `None` when the key is usable.
    pub fn cooling_for(&self) -> Option<Duration> {
        let until = self.cooldown_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub fn is_available(&self) -> bool {
        self.cooling_for().is_none()
    }

    /// The wall-clock end of the running cooldown, for display.
    pub fn cooldown_until(&self) -> Option<SystemTime> {
        self.cooling_for().map(|left| SystemTime::now() + left)
    }

    /// Where the cooldown's end stands on this process's clock: it grows
    /// each time a cooldown starts or is lengthened, so comparing two
    /// readings tells whether one did in between.
    pub fn cooldown_mark(&self) -> u64 {
        self.cooldown_until.load(Ordering::Relaxed)
    }

    /// Starts a cooldown until `until` (wall clock), unless one already
    /// running ends later: how another instance's cooldown is applied.
    pub fn cool_down_until(&self, until: SystemTime) {
        if let Ok(left) = until.duration_since(SystemTime::now()) {
            if !left.is_zero() {
                let until = now_ms().saturating_add(left.as_millis() as u64);
                self.cooldown_until.fetch_max(until, Ordering::Relaxed);
            }
        }
    }

    /// Starts a cooldown of `d`, unless one already running ends later.
    pub fn cool_down(&self, d: Duration) {
        let until = now_ms().saturating_add(d.as_millis() as u64);
        self.cooldown_until.fetch_max(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; the `max_failures`-th in a row starts `cooldown`.
    /// Returns true when this failure started a cooldown.
    pub fn record_failure(&self, max_failures: u32, cooldown: Duration) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= max_failures.max(1) {
            self.cool_down(cooldown);
            return true;
        }
        false
    }

    /// A failure that cools the key down at once (401, 403, 429).
    pub fn record_rejection(&self, cooldown: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.cool_down(cooldown);
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Marks an attempt as started; the guard marks it finished.
    pub fn begin(self: &std::sync::Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Holds a key's in-flight count up while an attempt or its response body lives.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<KeyHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_start_a_cooldown_that_ends() {
        let h = KeyHealth::default();
        assert!(!h.record_failure(3, Duration::from_secs(60)));
        h.record_success();
        assert!(!h.record_failure(3, Duration::from_secs(60)));
        assert!(!h.record_failure(3, Duration::from_secs(60)));
        assert!(h.is_available());
        assert!(h.record_failure(3, Duration::from_secs(60)));
        assert!(!h.is_available());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!h.is_available());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.is_available());
        assert_eq!(h.failures(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_is_never_shortened() {
        let h = KeyHealth::default();
        h.cool_down(Duration::from_secs(600));
        h.cool_down(Duration::from_secs(5));
        let left = h.cooling_for().unwrap();
        assert!(left > Duration::from_secs(590), "{left:?}");
    }

    #[test]
    fn in_flight_guard_counts() {
        let h = Arc::new(KeyHealth::default());
        let g = h.begin();
        assert_eq!((h.in_flight(), h.requests()), (1, 1));
        drop(g);
        assert_eq!((h.in_flight(), h.requests()), (0, 1));
    }
}
