//! Health of one (client, key) pair: consecutive failures, cooldown,
//! counters, and the key's last quota reading from its upstream.
//!
//! Lock-free (atomics only) because every attempt touches it. Shared by
//! `Arc` across routing-table generations, so it survives reloads.
//!
//! A quota reading (remaining requests or tokens, and when they reset)
//! replaces the last one of its kind and lapses at its reset; between
//! readings each attempt takes its share from it, so concurrent requests do
//! not all spend the same last request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The longest cooldown a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a key waiting for a probe reports as its time left once its
/// cooldown has run out: the probe is due, and comes within about this.
const PROBE_DUE: Duration = Duration::from_secs(1);

/// The result of the last background probe of a key (`ops::probe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    Ok,
    Invalid,
    RateLimited,
    UpstreamError,
    Unreachable,
}

impl ProbeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Invalid => "invalid",
            ProbeResult::RateLimited => "rate_limited",
            ProbeResult::UpstreamError => "upstream_error",
            ProbeResult::Unreachable => "unreachable",
        }
    }

    const ALL: [ProbeResult; 5] = [
        ProbeResult::Ok,
        ProbeResult::Invalid,
        ProbeResult::RateLimited,
        ProbeResult::UpstreamError,
        ProbeResult::Unreachable,
    ];
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on a process-local monotonic clock; never 0, which means "none".
fn now_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64 + 1
}

/// What an upstream's headers said about a key's quota; `None` where a
/// figure or its reset was missing or unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaReading {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

/// One figure of a quota reading: how many are left, and for how long
/// that holds (already capped at [`MAX_RETRY_AFTER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub left: u64,
    pub resets_in: Duration,
}

/// One figure of a reading as stored: the count, and the `now_ms()` at
/// which it lapses (0: no reading).
#[derive(Debug, Default)]
struct QuotaCell {
    left: AtomicU64,
    until: AtomicU64,
}

impl QuotaCell {
    fn record(&self, r: Option<Remaining>) {
        let Some(r) = r else { return };
        let resets_in = r.resets_in.min(MAX_RETRY_AFTER);
        // The count first: a reader that sees the new lapse time sees a
        // count at least as new (a torn read only errs for one request).
        self.left.store(r.left, Ordering::Relaxed);
        self.until.store(
            now_ms().saturating_add(resets_in.as_millis() as u64),
            Ordering::Relaxed,
        );
    }

    /// Whether a reading was ever recorded: without one, nothing needs
    /// the clock.
    fn is_empty(&self) -> bool {
        self.until.load(Ordering::Relaxed) == 0
    }

    /// The reading while it holds.
    fn get(&self, now: u64) -> Option<Remaining> {
        let until = self.until.load(Ordering::Relaxed);
        (until > now).then(|| Remaining {
            left: self.left.load(Ordering::Relaxed),
            resets_in: Duration::from_millis(until - now),
        })
    }

    fn take(&self, n: u64, now: u64) {
        if self.until.load(Ordering::Relaxed) > now {
            let _ = self
                .left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    Some(l.saturating_sub(n))
                });
        }
    }
}

#[derive(Debug, Default)]
pub struct KeyHealth {
    consecutive_failures: AtomicU32,
    /// `now_ms()` value at which the cooldown ends; 0 when none ever started.
    cooldown_until: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU32,
    /// Set by a 401/403 when probing is on: the key stays out of rotation
    /// past its cooldown until a background probe succeeds.
    awaiting_probe: AtomicBool,
    probes: AtomicU64,
    /// 1 + index into [`ProbeResult::ALL`]; 0 when never probed.
    last_probe: AtomicU8,
    quota_requests: QuotaCell,
    quota_tokens: QuotaCell,
}

impl KeyHealth {
    /// Time left in the current cooldown, `None` when the key is usable.
    /// A key never cooled down does not read the clock.
    pub fn cooling_for(&self) -> Option<Duration> {
        let until = self.cooldown_until.load(Ordering::Relaxed);
        if until != 0 {
            let now = now_ms();
            if until > now {
                return Some(Duration::from_millis(until - now));
            }
        }
        self.awaiting_probe
            .load(Ordering::Relaxed)
            .then_some(PROBE_DUE)
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

    /// A 401/403: cools the key down, and with `probe` keeps it out of
    /// rotation after the cooldown until a background probe succeeds, so
    /// no caller's request is the one to find out whether it was fixed.
    pub fn record_auth_rejection(&self, cooldown: Duration, probe: bool) {
        self.record_rejection(cooldown);
        if probe {
            self.awaiting_probe.store(true, Ordering::Relaxed);
        }
    }

    pub fn awaiting_probe(&self) -> bool {
        self.awaiting_probe.load(Ordering::Relaxed)
    }

    /// True when the key waits for a probe and its cooldown has run out.
    pub fn probe_due(&self) -> bool {
        self.awaiting_probe() && self.cooldown_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// Records a probe: success puts the key back in rotation, anything
    /// else waits another `cooldown` for the next probe.
    pub fn record_probe(&self, result: ProbeResult, cooldown: Duration) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let i = ProbeResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.last_probe.store(i as u8 + 1, Ordering::Relaxed);
        if result == ProbeResult::Ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.awaiting_probe.store(false, Ordering::Relaxed);
        } else {
            self.cool_down(cooldown);
        }
    }

    /// Lets a key waiting for a probe back without one (probing turned off).
    pub fn stop_awaiting_probe(&self) {
        self.awaiting_probe.store(false, Ordering::Relaxed);
    }

    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    pub fn last_probe(&self) -> Option<ProbeResult> {
        let i = self.last_probe.load(Ordering::Relaxed);
        ProbeResult::ALL
            .get(usize::from(i).checked_sub(1)?)
            .copied()
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

    /// Keeps the figures `r` has; the others stay as they were.
    pub fn record_quota(&self, r: &QuotaReading) {
        self.quota_requests.record(r.requests);
        self.quota_tokens.record(r.tokens);
    }

    /// The last reading, with the figures that still hold.
    pub fn quota(&self) -> QuotaReading {
        let now = now_ms();
        QuotaReading {
            requests: self.quota_requests.get(now),
            tokens: self.quota_tokens.get(now),
        }
    }

    /// How long until the key has quota for a request of `tokens` again;
    /// `None` when it has (or nothing says it has not). A short key is
    /// skipped, not failed.
    pub fn quota_short(&self, tokens: u64) -> Option<Duration> {
        if self.no_quota_reading() {
            return None;
        }
        let now = now_ms();
        let requests = self.quota_requests.get(now).filter(|r| r.left == 0);
        let tokens = self.quota_tokens.get(now).filter(|r| r.left < tokens);
        match (requests, tokens) {
            (Some(r), Some(t)) => Some(r.resets_in.max(t.resets_in)),
            (r, t) => r.or(t).map(|r| r.resets_in),
        }
    }

    /// How many more requests of `tokens` the last reading leaves room
    /// for; `u64::MAX` when nothing is known.
    pub fn headroom(&self, tokens: u64) -> u64 {
        if self.no_quota_reading() {
            return u64::MAX;
        }
        let now = now_ms();
        let requests = self.quota_requests.get(now).map_or(u64::MAX, |r| r.left);
        let by_tokens = self
            .quota_tokens
            .get(now)
            .map_or(u64::MAX, |t| t.left / tokens.max(1));
        requests.min(by_tokens)
    }

    /// Takes one request and `tokens` from the reading, until the next
    /// reading replaces it.
    pub fn spend_quota(&self, tokens: u64) {
        if self.no_quota_reading() {
            return;
        }
        let now = now_ms();
        self.quota_requests.take(1, now);
        self.quota_tokens.take(tokens, now);
    }

    /// No upstream ever sent a quota figure for this key (the usual case):
    /// the per-request quota checks then skip the clock.
    fn no_quota_reading(&self) -> bool {
        self.quota_requests.is_empty() && self.quota_tokens.is_empty()
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

    #[tokio::test(start_paused = true)]
    async fn an_auth_rejection_waits_for_a_probe_past_its_cooldown() {
        let cd = Duration::from_secs(60);
        let h = KeyHealth::default();
        h.record_auth_rejection(cd, true);
        assert!(!h.probe_due());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!h.is_available(), "no caller may find out");
        assert!(h.probe_due());
        h.record_probe(ProbeResult::Invalid, cd);
        assert!(!h.probe_due(), "the next probe waits one cooldown");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(h.probe_due());
        h.record_probe(ProbeResult::Ok, cd);
        assert!(h.is_available());
        assert_eq!((h.probes(), h.last_probe()), (2, Some(ProbeResult::Ok)));
    }

    #[tokio::test(start_paused = true)]
    async fn without_probing_an_auth_rejection_ends_with_its_cooldown() {
        let h = KeyHealth::default();
        h.record_auth_rejection(Duration::from_secs(60), false);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(h.is_available());
        assert!(!h.probe_due());
    }

    fn reading(requests: Option<(u64, u64)>, tokens: Option<(u64, u64)>) -> QuotaReading {
        let r = |(left, secs): (u64, u64)| Remaining {
            left,
            resets_in: Duration::from_secs(secs),
        };
        QuotaReading {
            requests: requests.map(r),
            tokens: tokens.map(r),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_key_is_skipped_until_its_reset_without_a_failure() {
        let h = KeyHealth::default();
        assert_eq!(h.quota_short(1000), None, "no reading: not short");
        h.record_quota(&reading(Some((0, 10)), Some((5000, 20))));
        assert!(h
            .quota_short(1)
            .is_some_and(|d| d <= Duration::from_secs(10)));
        assert!(h.is_available() && h.failures() == 0);
        // A response without figures leaves the reading as it was.
        h.record_quota(&QuotaReading::default());
        assert!(h.quota_short(1).is_some());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(h.quota_short(1000), None, "requests reset, tokens enough");
        assert_eq!(h.quota_short(6000).map(|d| d.as_secs()), Some(9));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(h.quota(), QuotaReading::default(), "every figure lapsed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_far_away_is_capped_at_an_hour() {
        let h = KeyHealth::default();
        h.record_quota(&reading(Some((0, 1_000_000)), None));
        let left = h.quota().requests.unwrap().resets_in;
        assert!(left <= MAX_RETRY_AFTER, "{left:?}");
        tokio::time::advance(MAX_RETRY_AFTER + Duration::from_secs(1)).await;
        assert_eq!(h.quota_short(1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn headroom_counts_requests_of_this_size_and_spending_lowers_it() {
        let h = KeyHealth::default();
        assert_eq!(h.headroom(100), u64::MAX);
        h.record_quota(&reading(Some((50, 60)), Some((1000, 60))));
        assert_eq!(h.headroom(100), 10);
        assert_eq!(h.headroom(10), 50);
        h.spend_quota(100);
        assert_eq!(h.quota().requests.unwrap().left, 49);
        assert_eq!(h.headroom(100), 9);
        for _ in 0..100 {
            h.spend_quota(100);
        }
        assert_eq!(h.quota().tokens.unwrap().left, 0, "never below zero");
        assert!(h.quota_short(1).is_some());
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
