//! Callers' limits: concurrency, requests and tokens per rolling minute,
//! and budgets per UTC day or month.
//!
//! Knows no HTTP. A request is **admitted** by one atomic
//! reserve-and-check of its estimated cost ([`CallerState::admit`]): the
//! check and the reservation happen under one short lock, so N concurrent
//! requests against headroom for k admit at most k. When the response
//! ends, its [`Ticket`] is **settled** to what the upstream reported
//! (refunded to nothing when the caller got no 2xx answer).
//!
//! A caller's state lives as long as its name: a reload that edits its
//! limits keeps what it has spent and reserved.
//!
//! Two backends, one interface: without `shared_state` every admission is
//! [`CallerState::admit`] here (no allocation, one short lock); with it,
//! [`shared::SharedState::admit`] reserves in Redis, and this state keeps
//! only the instance's own spend (which it publishes) and, during an
//! outage under `local_share`, the in-process share of each limit.

pub mod lease;
pub mod shared;
pub mod window;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::calendar::civil_from_days;
use crate::config::{Budget, CallerLimits, Per};
use window::Window;

/// What a request is expected to cost (at admission) or cost (at settlement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub tokens: u64,
    /// Nano-dollars; 0 when unpriced.
    pub nanos: i64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Concurrency,
    Rpm { retry_after: Duration },
    Tpm { retry_after: Duration },
    BudgetUsd { per: Per },
    BudgetTokens { per: Per },
}

impl Refusal {
    /// The reason as metrics and rows name it.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Concurrency => "concurrency",
            Refusal::Rpm { .. } => "rpm",
            Refusal::Tpm { .. } => "tpm",
            Refusal::BudgetUsd { .. } => "budget_usd",
            Refusal::BudgetTokens { .. } => "budget_tokens",
        }
    }
}

/// The `x-ratelimit-*` figures of an admitted request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    /// `(limit, remaining, reset)` for requests per minute, when limited.
    pub requests: Option<(u64, u64, Duration)>,
    /// The same for tokens per minute.
    pub tokens: Option<(u64, u64, Duration)>,
}

/// The day and month (UTC) a time falls in, as counted since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub day: u64,
    /// `year * 12 + month - 1`.
    pub month: u64,
    /// Seconds since the epoch.
    pub second: u64,
}

impl Periods {
    pub fn of(t: SystemTime) -> Periods {
        let second = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let day = second / 86_400;
        let (y, m, _) = civil_from_days(day);
        Periods {
            day,
            month: y * 12 + m - 1,
            second,
        }
    }

    fn of_per(&self, per: Per) -> u64 {
        match per {
            Per::Day => self.day,
            Per::Month => self.month,
        }
    }
}

/// Settled spend in one period, and which period it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub period: u64,
    pub tokens: u64,
    pub nanos: i64,
}

impl Spend {
    /// The spend of `period`: what is counted, or nothing for a new period.
    fn at(&mut self, period: u64) -> &mut Spend {
        if self.period != period {
            *self = Spend {
                period,
                ..Spend::default()
            };
        }
        self
    }
}

/// One caller's counters. Every field changes under the one lock.
#[derive(Debug, Default)]
struct Counters {
    in_flight: u32,
    requests: Window,
    tokens: Window,
    /// Reservations not yet settled, across periods.
    reserved: Cost,
    day: Spend,
    month: Spend,
}

impl Counters {
    fn spend(&mut self, per: Per, p: &Periods) -> &mut Spend {
        match per {
            Per::Day => self.day.at(p.day),
            Per::Month => self.month.at(p.month),
        }
    }
}

/// A caller's state, shared by every request of that caller and kept across
/// reloads.
#[derive(Debug, Default)]
pub struct CallerState {
    counters: Mutex<Counters>,
}

/// An admitted request's reservation; settle it with [`CallerState::settle`]
/// once the response has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub reserved: Cost,
    /// When it was admitted.
    pub at: Periods,
    /// Whether it holds a concurrency slot.
    concurrent: bool,
}

/// A snapshot of a caller's state, for `/admin/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub in_flight: u32,
    pub rpm_used: u64,
    pub tpm_used: u64,
    pub spent_tokens: u64,
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
}

impl CallerState {
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks every limit against `cost` and, when all allow it, reserves
    /// it: one step under one lock. Budgets count what was settled in
    /// their period plus every reservation not yet settled.
    pub fn admit(
        &self,
        limits: &CallerLimits,
        cost: Cost,
        now: SystemTime,
    ) -> Result<(Ticket, Headroom), Refusal> {
        let p = Periods::of(now);
        let s = p.second;
        let mut c = self.lock();
        if let Some(max) = limits.concurrency {
            if c.in_flight >= max {
                return Err(Refusal::Concurrency);
            }
        }
        if let Some(rpm) = limits.rpm {
            if c.requests.sum(s) >= rpm {
                let wait = c.requests.seconds_until_at_most(s, rpm - 1).unwrap_or(1);
                return Err(Refusal::Rpm {
                    retry_after: Duration::from_secs(wait.max(1)),
                });
            }
        }
        if let Some(tpm) = limits.tpm {
            let used = c.tokens.sum(s);
            // A request larger than the whole limit passes only into an
            // empty window: otherwise it could never run.
            let fits = used.saturating_add(cost.tokens) <= tpm || (used == 0 && cost.tokens > tpm);
            if !fits {
                let target = tpm.saturating_sub(cost.tokens.min(tpm));
                let wait = c.tokens.seconds_until_at_most(s, target).unwrap_or(1);
                return Err(Refusal::Tpm {
                    retry_after: Duration::from_secs(wait.max(1)),
                });
            }
        }
        let reserved = c.reserved;
        if let Some(b) = limits.budget_tokens {
            let spent = c.spend(b.per, &p).tokens;
            if !within(spent.saturating_add(reserved.tokens), cost.tokens, b) {
                return Err(Refusal::BudgetTokens { per: b.per });
            }
        }
        if let Some(b) = limits.budget_usd {
            let spent = c.spend(b.per, &p).nanos;
            let used = spent.saturating_add(reserved.nanos);
            if !within(used.max(0) as u64, cost.nanos.max(0) as u64, b) {
                return Err(Refusal::BudgetUsd { per: b.per });
            }
        }
        // Every limit allows it: reserve.
        let concurrent = limits.concurrency.is_some();
        if concurrent {
            c.in_flight += 1;
        }
        c.requests.add(s, 1);
        c.tokens.add(s, cost.tokens);
        c.reserved.tokens = c.reserved.tokens.saturating_add(cost.tokens);
        c.reserved.nanos = c.reserved.nanos.saturating_add(cost.nanos);
        let headroom = Headroom {
            requests: limits.rpm.map(|rpm| {
                let used = c.requests.sum(s);
                (
                    rpm,
                    rpm.saturating_sub(used),
                    secs(c.requests.seconds_until_empty(s)),
                )
            }),
            tokens: limits.tpm.map(|tpm| {
                let used = c.tokens.sum(s);
                (
                    tpm,
                    tpm.saturating_sub(used),
                    secs(c.tokens.seconds_until_empty(s)),
                )
            }),
        };
        Ok((
            Ticket {
                reserved: cost,
                at: p,
                concurrent,
            },
            headroom,
        ))
    }

    /// Ends a reservation: its tokens in the minute window become `actual`
    /// (0 when refunded), and `actual` is spent in the periods the request
    /// started in (if they are still the current ones).
    pub fn settle(&self, ticket: Ticket, actual: Cost) {
        let mut c = self.lock();
        if ticket.concurrent {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        c.reserved.tokens = c.reserved.tokens.saturating_sub(ticket.reserved.tokens);
        c.reserved.nanos = c.reserved.nanos.saturating_sub(ticket.reserved.nanos);
        c.tokens
            .adjust(ticket.at.second, ticket.reserved.tokens, actual.tokens);
        for per in [Per::Day, Per::Month] {
            let period = ticket.at.of_per(per);
            let spend = match per {
                Per::Day => &mut c.day,
                Per::Month => &mut c.month,
            };
            // A reservation from an earlier period settles into nothing
            // current: its spend belongs to that period.
            if spend.period == period {
                spend.tokens = spend.tokens.saturating_add(actual.tokens);
                spend.nanos = spend.nanos.saturating_add(actual.nanos);
            }
        }
    }

    /// Adds spend recorded before this process started (from usage files)
    /// to the current day and month.
    pub fn add_spent(&self, now: SystemTime, day: Cost, month: Cost) {
        let p = Periods::of(now);
        let mut c = self.lock();
        let d = c.day.at(p.day);
        d.tokens = d.tokens.saturating_add(day.tokens);
        d.nanos = d.nanos.saturating_add(day.nanos);
        let m = c.month.at(p.month);
        m.tokens = m.tokens.saturating_add(month.tokens);
        m.nanos = m.nanos.saturating_add(month.nanos);
    }

    /// Counts spend settled through the shared backend: this instance's
    /// own, in the periods the request started in.
    pub fn record_spend(&self, at: Periods, actual: Cost) {
        let mut guard = self.lock();
        let c = &mut *guard;
        for (spend, period) in [(&mut c.day, at.day), (&mut c.month, at.month)] {
            // A period not yet counted here starts now; one gone by is over.
            if period >= spend.period {
                let s = spend.at(period);
                s.tokens = s.tokens.saturating_add(actual.tokens);
                s.nanos = s.nanos.saturating_add(actual.nanos);
            }
        }
    }

    /// This instance's settled spend of the current day and month.
    pub fn own_spend(&self, now: SystemTime) -> (Spend, Spend) {
        let p = Periods::of(now);
        let mut c = self.lock();
        (*c.day.at(p.day), *c.month.at(p.month))
    }

    /// The requests and tokens counted in the last minute, per second, and
    /// the windows emptied: what was admitted in process during an outage,
    /// handed to the shared windows once they answer again.
    pub fn take_window(&self, now: SystemTime) -> Vec<(u64, u64, u64)> {
        let s = Periods::of(now).second;
        let mut c = self.lock();
        let out = (s.saturating_sub(window::SPAN - 1)..=s)
            .map(|sec| (sec, c.requests.at(sec), c.tokens.at(sec)))
            .filter(|&(_, r, t)| r > 0 || t > 0)
            .collect();
        c.requests = Window::default();
        c.tokens = Window::default();
        out
    }

    /// What the caller has used, with budgets counted per `per`.
    pub fn snapshot(&self, now: SystemTime, per: Per) -> Snapshot {
        let p = Periods::of(now);
        let mut c = self.lock();
        let (rpm_used, tpm_used) = (c.requests.sum(p.second), c.tokens.sum(p.second));
        let reserved = c.reserved;
        let in_flight = c.in_flight;
        let spent = *c.spend(per, &p);
        Snapshot {
            in_flight,
            rpm_used,
            tpm_used,
            spent_tokens: spent.tokens,
            spent_nanos: spent.nanos,
            reserved_nanos: reserved.nanos,
        }
    }
}

/// Whether `own` fits a budget next to `used`.
fn within(used: u64, own: u64, b: Budget) -> bool {
    used.saturating_add(own) <= b.amount.max(0) as u64
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Caller states by name, carried from one routing table to the next.
pub type States = std::collections::HashMap<String, Arc<CallerState>>;

/// Counts this thread's allocations, for the test that the
/// reserve-and-check path makes none.
#[cfg(test)]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        pub static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: every call is passed to the system allocator as is; only a
    // thread-local counter (const-initialised, so it never allocates)
    // is added.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: the caller's contract is passed on unchanged.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: as above.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 callers with every limit, admitted and settled in turn over
    /// two minutes of clock: not one allocation.
    #[test]
    fn reserve_and_check_allocates_nothing() {
        let every = CallerLimits {
            rpm: Some(1_000_000),
            tpm: Some(1_000_000_000),
            concurrency: Some(100),
            budget_usd: Some(Budget {
                amount: i64::MAX / 2,
                per: Per::Month,
            }),
            budget_tokens: Some(Budget {
                amount: i64::MAX / 2,
                per: Per::Day,
            }),
        };
        let callers: Vec<CallerState> = (0..1000).map(|_| CallerState::default()).collect();
        let cost = Cost {
            tokens: 300,
            nanos: 45_000,
        };
        let t0 = 1_800_000_000;
        let before = counting::ALLOCATIONS.with(|n| n.get());
        for i in 0..120_000u64 {
            let st = &callers[(i % 1000) as usize];
            let now = at(t0 + i / 1000);
            let (ticket, headroom) = st.admit(&every, cost, now).unwrap();
            assert!(headroom.requests.is_some() && headroom.tokens.is_some());
            st.settle(
                ticket,
                Cost {
                    tokens: 250,
                    nanos: 40_000,
                },
            );
        }
        let after = counting::ALLOCATIONS.with(|n| n.get());
        assert_eq!(
            after - before,
            0,
            "allocations on the reserve-and-check path"
        );
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn rpm_admits_up_to_the_limit_in_a_rolling_minute() {
        let st = CallerState::default();
        let l = CallerLimits {
            rpm: Some(3),
            ..Default::default()
        };
        let t0 = 1_800_000_000;
        for i in 0..3 {
            let (_, h) = st.admit(&l, Cost::default(), at(t0 + i)).unwrap();
            assert_eq!(h.requests.unwrap().1, 2 - i);
        }
        let err = st.admit(&l, Cost::default(), at(t0 + 10)).unwrap_err();
        assert_eq!(
            err,
            Refusal::Rpm {
                retry_after: Duration::from_secs(50)
            }
        );
        assert!(st.admit(&l, Cost::default(), at(t0 + 60)).is_ok());
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let st = CallerState::default();
        let l = CallerLimits {
            tpm: Some(1000),
            ..Default::default()
        };
        let now = at(1_800_000_000);
        let cost = |tokens| Cost { tokens, nanos: 0 };
        let (t1, _) = st.admit(&l, cost(600), now).unwrap();
        assert!(matches!(
            st.admit(&l, cost(600), now),
            Err(Refusal::Tpm { .. })
        ));
        st.settle(t1, cost(100));
        let (_, h) = st.admit(&l, cost(600), now).unwrap();
        assert_eq!(h.tokens.unwrap().1, 300);
        // Larger than the limit: only into an empty window.
        let fresh = CallerState::default();
        assert!(fresh.admit(&l, cost(5000), now).is_ok());
        assert!(fresh.admit(&l, cost(5000), now).is_err());
    }

    #[test]
    fn budgets_count_spent_and_reserved_and_reset_with_the_period() {
        let st = CallerState::default();
        let l = CallerLimits {
            budget_usd: Some(Budget {
                amount: 1000,
                per: Per::Day,
            }),
            concurrency: Some(10),
            ..Default::default()
        };
        let day1 = at(1_800_000_000);
        let cost = |nanos| Cost { tokens: 0, nanos };
        let (a, _) = st.admit(&l, cost(400), day1).unwrap();
        let (b, _) = st.admit(&l, cost(400), day1).unwrap();
        assert_eq!(
            st.admit(&l, cost(400), day1).unwrap_err(),
            Refusal::BudgetUsd { per: Per::Day }
        );
        st.settle(a, cost(0));
        st.settle(b, cost(700));
        assert_eq!(st.snapshot(day1, Per::Day).spent_nanos, 700);
        assert!(st.admit(&l, cost(400), day1).is_err());
        let (c, _) = st.admit(&l, cost(300), day1).unwrap();
        // A reservation still open counts in the next period too.
        let day2 = at(1_800_000_000 + 86_400);
        assert!(st.admit(&l, cost(900), day2).is_err());
        st.settle(c, cost(300));
        assert!(st.admit(&l, cost(900), day2).is_ok());
        assert_eq!(st.snapshot(day2, Per::Day).spent_nanos, 0);
    }

    #[test]
    fn concurrency_counts_requests_until_settled() {
        let st = CallerState::default();
        let l = CallerLimits {
            concurrency: Some(2),
            ..Default::default()
        };
        let now = at(1_800_000_000);
        let (a, _) = st.admit(&l, Cost::default(), now).unwrap();
        let _b = st.admit(&l, Cost::default(), now).unwrap();
        assert_eq!(
            st.admit(&l, Cost::default(), now).unwrap_err(),
            Refusal::Concurrency
        );
        st.settle(a, Cost::default());
        assert!(st.admit(&l, Cost::default(), now).is_ok());
    }

    /// N threads at once against room for k: exactly k get in.
    #[test]
    fn concurrent_admissions_never_overshoot() {
        let st = Arc::new(CallerState::default());
        let l = CallerLimits {
            budget_tokens: Some(Budget {
                amount: 1000,
                per: Per::Month,
            }),
            ..Default::default()
        };
        let now = at(1_800_000_000);
        let admitted: usize = (0..32)
            .map(|_| {
                let (st, l) = (st.clone(), l.clone());
                std::thread::spawn(move || {
                    st.admit(
                        &l,
                        Cost {
                            tokens: 100,
                            nanos: 0,
                        },
                        now,
                    )
                    .is_ok() as usize
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn a_share_divides_every_limit_by_the_replicas() {
        let l = CallerLimits {
            rpm: Some(10),
            tpm: Some(1000),
            concurrency: Some(2),
            budget_usd: Some(Budget {
                amount: 900,
                per: Per::Day,
            }),
            budget_tokens: None,
        };
        let s = l.share(3);
        assert_eq!((s.rpm, s.tpm, s.concurrency), (Some(3), Some(333), Some(1)));
        assert_eq!(s.budget_usd.unwrap().amount, 300);
        assert_eq!(l.share(1), l);
    }

    /// What was admitted in process during an outage is handed over once,
    /// per second, and the windows start again from nothing.
    #[test]
    fn the_window_is_taken_once() {
        let st = CallerState::default();
        let l = CallerLimits {
            rpm: Some(100),
            ..Default::default()
        };
        let t0 = 1_800_000_000;
        st.admit(
            &l,
            Cost {
                tokens: 5,
                nanos: 0,
            },
            at(t0),
        )
        .unwrap();
        st.admit(
            &l,
            Cost {
                tokens: 7,
                nanos: 0,
            },
            at(t0),
        )
        .unwrap();
        st.admit(
            &l,
            Cost {
                tokens: 1,
                nanos: 0,
            },
            at(t0 + 2),
        )
        .unwrap();
        assert_eq!(st.take_window(at(t0 + 3)), [(t0, 2, 12), (t0 + 2, 1, 1)]);
        assert!(st.take_window(at(t0 + 3)).is_empty());
        assert_eq!(st.snapshot(at(t0 + 3), Per::Day).rpm_used, 0);
    }

    #[test]
    fn own_spend_counts_what_was_settled_in_its_period() {
        let st = CallerState::default();
        let day1 = at(1_800_000_000);
        let p = Periods::of(day1);
        st.record_spend(
            p,
            Cost {
                tokens: 10,
                nanos: 20,
            },
        );
        let (d, m) = st.own_spend(day1);
        assert_eq!((d.tokens, d.nanos, m.tokens), (10, 20, 10));
        // Next day: the day starts from nothing, the month goes on.
        let day2 = at(1_800_000_000 + 86_400);
        let (d, _) = st.own_spend(day2);
        assert_eq!(d.tokens, 0);
        // A ticket of yesterday settles into no current day.
        st.record_spend(
            p,
            Cost {
                tokens: 5,
                nanos: 0,
            },
        );
        assert_eq!(st.own_spend(day2).0.tokens, 0);
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let p = Periods::of(humantime::parse_rfc3339("2026-03-01T00:00:00Z").unwrap());
        let q = Periods::of(humantime::parse_rfc3339("2026-02-28T23:59:59Z").unwrap());
        assert_eq!(p.day, q.day + 1);
        assert_eq!(p.month, q.month + 1);
        assert_eq!(p.month, 2026 * 12 + 2);
    }
}
