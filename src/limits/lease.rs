//! Headroom leases: a caller's allowance taken from Redis in chunks, so that
//! an instance admits most requests with no Redis work at all.
//!
//! When a caller is busy on this instance (at least [`MIN_USE`] admissions
//! in the last second) and every one of its limits has plenty of room, the
//! lease keeper ([`super::shared::SharedState`]'s `keep_leases`) takes a
//! **lease** in one script item: about two seconds of this instance's
//! demand (requests for `rpm`, tokens for `tpm` and token budgets,
//! nano-dollars for USD budgets, slots for `concurrency`). Redis counts it
//! at once as used and reserved — the requests and tokens in the current
//! second of the rolling minute, the slots and budget amounts as one ticket
//! of the caller with a deadline, refreshed by the heartbeat like any other
//! — so the total across instances can never pass a limit. Requests are
//! then admitted here, under one short lock, from what the lease has left.
//!
//! Room is plenty when each limit has at least [`ROOM`] × `replicas` times
//! the lease left; otherwise no lease is granted and every request takes
//! the exact path (one script item per admission and per settle), so small
//! limits and limits nearly reached stay exact to the request.
//!
//! Each lease lives about [`LIFE`] (0.75 to 1.25 of it, at random, so that
//! leases taken together are not all relet together; the keeper sends
//! [`RELETS_PER_TICK`] relets per tick at most, the longest waiting first): then, in the same script item that takes
//! the next one, it is given back — the requests and tokens it did not use
//! leave the second they were counted in, and its ticket is replaced by the
//! new lease's (which also holds the slots and budget amounts of requests
//! admitted from the old one and still in flight). A lease whose caller went
//! quiet is given back the same way. A crashed instance's lease frees its
//! slots and budget amounts at its deadline; the requests and tokens it did
//! not use stay counted in the minute they were taken in (never too few).
//!
//! Budgets: a request admitted from a lease spends from this instance's own
//! figures (published with the next lease or heartbeat); until then the
//! lease still reserves its estimate, so Redis counts it twice for a moment,
//! never zero times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Cost, Headroom};
use crate::config::CallerLimits;

/// How often the keeper looks at every lease.
pub const TICK: Duration = Duration::from_millis(250);
/// How long a lease is used before it is given back and taken anew, on
/// average ([`life`] spreads it).
pub const LIFE: Duration = Duration::from_secs(1);
/// Admissions of a caller in the last second on this instance before it
/// leases: below that, the exact path costs Redis little.
pub const MIN_USE: u64 = 8;
/// A lease is granted only when every limit has room for this many times
/// it per instance (`replicas`).
pub const ROOM: u64 = 4;
/// Ticks the demand is measured over: one [`LIFE`].
const TICKS: usize = 4;
/// Relets sent to Redis per tick at most: enough for about a thousand
/// busy callers relet each second.
pub const RELETS_PER_TICK: usize = 256;
/// Relets per script call: with many busy callers, calls this small, one
/// after the other's answer, let the admission batcher's calls reach Redis
/// between them.
pub const RELETS_PER_CALL: usize = 64;

/// A lease's life: 0.75 to 1.25 times [`LIFE`], at random, so that the
/// relets of leases taken in the same tick spread over half a second.
fn life() -> Duration {
    LIFE.mul_f64(0.75 + fastrand::f64() / 2.0)
}

/// Marks a ticket admitted from a lease: which one, and whether it holds a
/// slot of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseMark {
    epoch: u64,
    gen: u64,
    slot: bool,
}

/// Amounts of each kind a lease deals in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub reqs: u64,
    pub slots: u64,
    pub tokens: u64,
    pub nanos: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Demand {
    reqs: u64,
    tokens: u64,
    nanos: i64,
    /// The most requests in flight at once.
    peak: u64,
}

/// The lease Redis holds for this instance and caller.
#[derive(Debug, Clone)]
pub struct Held {
    /// The ticket's name after `instance:lease:`.
    pub suffix: String,
    /// Redis's second when it was taken: where its requests and tokens count.
    pub second: u64,
    /// Requests and tokens it added to that second.
    pub reqs: u64,
    pub tokens: u64,
}

/// What the keeper asks of Redis for one caller: give `old` back (with
/// what was used of it), take a new lease of `want` on top of what is in
/// flight, or hold only what is in flight.
#[derive(Debug, Clone)]
pub struct Relet {
    pub caller: Arc<str>,
    epoch: u64,
    pub old: Option<Held>,
    pub used_reqs: u64,
    pub used_tokens: u64,
    pub seq: u64,
    pub want: Amounts,
    /// Held for requests admitted from leases and still in flight.
    pub in_flight: Amounts,
    pub limits: CallerLimits,
}

impl Relet {
    /// The new ticket's name after `instance:lease:`, as Redis names it:
    /// `seq:slots:requests:tokens:nanos`, slots and budget amounts counting
    /// what is in flight too.
    fn suffix(&self, g: Amounts) -> String {
        let f = self.in_flight;
        format!(
            "{}:{}:{}:{}:{}",
            self.seq,
            g.slots + f.slots,
            g.reqs,
            g.tokens + f.tokens,
            g.nanos + f.nanos
        )
    }
}

/// One caller's lease on this instance.
#[derive(Debug, Default)]
struct Lease {
    limits: CallerLimits,
    /// A new epoch when the lease was lost: tickets of an older one settle
    /// into nothing here.
    epoch: u64,
    /// A new generation with each relet: `used_*` count the current one.
    gen: u64,
    held: Option<Held>,
    /// Whether `held` is a granted lease (not only what is in flight).
    granted: bool,
    left: Amounts,
    /// Admitted from leases and not settled (`reqs`: how many).
    in_flight: Amounts,
    used_reqs: u64,
    used_tokens: u64,
    demand: [Demand; TICKS],
    tick: usize,
    /// This caller's requests in flight on this instance, any path.
    busy: u64,
    /// Redis's requests and tokens of the minute when the lease was taken.
    known: (u64, u64),
    /// When Redis last answered for it (granted or not).
    taken: Option<Instant>,
    /// How long after `taken` it is relet: [`LIFE`] spread at random
    /// ([`life`]), so that leases taken together are not relet together.
    life: Duration,
    /// A relet is out.
    pending: bool,
    /// A request found the lease short since the last relet.
    starved: bool,
}

impl Lease {
    fn demand(&self) -> Demand {
        self.demand.iter().fold(Demand::default(), |a, d| Demand {
            reqs: a.reqs + d.reqs,
            tokens: a.tokens.saturating_add(d.tokens),
            nanos: a.nanos.saturating_add(d.nanos),
            peak: a.peak.max(d.peak),
        })
    }

    fn busier(&mut self) {
        self.busy += 1;
        let d = &mut self.demand[self.tick];
        d.peak = d.peak.max(self.busy);
    }

    /// Drops the lease: what it held frees itself in Redis by its deadline.
    fn lose(&mut self) {
        self.epoch += 1;
        self.held = None;
        self.granted = false;
        self.left = Amounts::default();
        self.in_flight = Amounts::default();
        self.used_reqs = 0;
        self.used_tokens = 0;
        self.pending = false;
    }
}

/// Every caller's lease on this instance.
#[derive(Debug, Default)]
pub struct Leases {
    map: Mutex<HashMap<Arc<str>, Lease>>,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Lease>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an admission asked for, and admits it from the caller's lease
    /// when that has enough left of every limit the caller has.
    pub fn take(
        &self,
        caller: &Arc<str>,
        limits: &CallerLimits,
        cost: Cost,
    ) -> Option<(LeaseMark, Headroom)> {
        let mut map = self.lock();
        let l = match map.get_mut(caller) {
            Some(l) => l,
            None => map.entry(caller.clone()).or_default(),
        };
        if l.limits != *limits {
            l.limits = limits.clone();
        }
        let d = &mut l.demand[l.tick];
        d.reqs += 1;
        d.tokens = d.tokens.saturating_add(cost.tokens);
        d.nanos = d.nanos.saturating_add(cost.nanos.max(0));
        if !l.granted || l.pending {
            return None;
        }
        let slot = limits.concurrency.is_some();
        let left = l.left;
        let short = (limits.rpm.is_some() && left.reqs == 0)
            || (slot && left.slots == 0)
            || ((limits.tpm.is_some() || limits.budget_tokens.is_some())
                && left.tokens < cost.tokens)
            || (limits.budget_usd.is_some() && left.nanos < cost.nanos.max(0));
        if short {
            l.starved = true;
            return None;
        }
        l.left = Amounts {
            reqs: left.reqs.saturating_sub(1),
            slots: left.slots - u64::from(slot),
            tokens: left.tokens.saturating_sub(cost.tokens),
            nanos: left.nanos.saturating_sub(cost.nanos.max(0)).max(0),
        };
        l.in_flight.reqs += 1;
        l.in_flight.slots += u64::from(slot);
        l.in_flight.tokens = l.in_flight.tokens.saturating_add(cost.tokens);
        l.in_flight.nanos = l.in_flight.nanos.saturating_add(cost.nanos.max(0));
        l.used_reqs += 1;
        l.used_tokens = l.used_tokens.saturating_add(cost.tokens);
        l.busier();
        let reset = Duration::from_secs(60);
        let headroom = Headroom {
            requests: limits
                .rpm
                .map(|rpm| (rpm, rpm.saturating_sub(l.known.0 + l.used_reqs), reset)),
            tokens: limits.tpm.map(|tpm| {
                (
                    tpm,
                    tpm.saturating_sub(l.known.1.saturating_add(l.used_tokens)),
                    reset,
                )
            }),
        };
        let mark = LeaseMark {
            epoch: l.epoch,
            gen: l.gen,
            slot,
        };
        Some((mark, headroom))
    }

    /// Counts a request Redis admitted (the exact path) as in flight.
    pub fn admitted(&self, caller: &Arc<str>) {
        if let Some(l) = self.lock().get_mut(caller) {
            l.busier();
        }
    }

    /// Ends a request of `caller`: one from a lease gives its slot back to
    /// the lease and turns its estimate into what it used.
    pub fn settle(&self, caller: &str, mark: Option<LeaseMark>, reserved: Cost, actual: Cost) {
        let mut map = self.lock();
        let Some(l) = map.get_mut(caller) else {
            return;
        };
        l.busy = l.busy.saturating_sub(1);
        let Some(m) = mark.filter(|m| m.epoch == l.epoch) else {
            return;
        };
        let f = &mut l.in_flight;
        f.reqs = f.reqs.saturating_sub(1);
        f.tokens = f.tokens.saturating_sub(reserved.tokens);
        f.nanos = f.nanos.saturating_sub(reserved.nanos.max(0)).max(0);
        if m.slot {
            f.slots = f.slots.saturating_sub(1);
            // The current ticket holds a slot for every request in flight.
            l.left.slots += 1;
        }
        if m.gen == l.gen {
            l.used_tokens = l
                .used_tokens
                .saturating_sub(reserved.tokens)
                .saturating_add(actual.tokens);
        }
    }

    /// The relets due now, one per caller at most and `most` in all (the
    /// longest waiting first; the others stay due for the next tick);
    /// their leases stop admitting until Redis answers. Moves the demand
    /// on by a tick and forgets callers with nothing held and nothing asked.
    pub fn plan(&self, now: Instant, seq: &AtomicU64, most: usize) -> Vec<Relet> {
        let mut map = self.lock();
        map.retain(|_, l| l.held.is_some() || l.pending || l.busy > 0 || l.demand().reqs > 0);
        let mut due = Vec::new();
        for (caller, l) in map.iter_mut() {
            let d = l.demand();
            l.tick = (l.tick + 1) % TICKS;
            l.demand[l.tick] = Demand {
                peak: l.busy,
                ..Demand::default()
            };
            if l.pending {
                continue;
            }
            let wants = d.reqs >= MIN_USE;
            let old_enough = l.taken.is_none_or(|t| now.duration_since(t) >= l.life);
            let is_due = match (&l.held, wants) {
                (None, false) => false,
                (None, true) => old_enough,
                // Given back once nothing it holds is in flight.
                (Some(_), false) => l.granted || l.in_flight.reqs == 0,
                (Some(_), true) => old_enough || (l.starved && l.granted),
            };
            if !is_due {
                continue;
            }
            let lim = &l.limits;
            let want = if wants {
                Amounts {
                    reqs: if lim.rpm.is_some() { 2 * d.reqs } else { 0 },
                    slots: if lim.concurrency.is_some() {
                        2 * d.peak + 2
                    } else {
                        0
                    },
                    tokens: if lim.tpm.is_some() || lim.budget_tokens.is_some() {
                        d.tokens.saturating_mul(2).max(1)
                    } else {
                        0
                    },
                    nanos: if lim.budget_usd.is_some() {
                        d.nanos.saturating_mul(2)
                    } else {
                        0
                    },
                }
            } else {
                Amounts::default()
            };
            due.push((l.taken, caller.clone(), want));
        }
        // Never answered first, then the oldest answer.
        due.sort_unstable_by_key(|(taken, _, _)| *taken);
        due.truncate(most);
        let mut out = Vec::with_capacity(due.len());
        for (_, caller, want) in due {
            let Some(l) = map.get_mut(&caller) else {
                continue;
            };
            out.push(Relet {
                caller,
                epoch: l.epoch,
                old: l.held.clone(),
                used_reqs: l.used_reqs,
                used_tokens: l.used_tokens,
                seq: seq.fetch_add(1, Ordering::Relaxed),
                want,
                in_flight: l.in_flight,
                limits: l.limits.clone(),
            });
            // The old lease stops here; its slots in flight stay held.
            l.gen += 1;
            l.left = Amounts::default();
            l.used_reqs = 0;
            l.used_tokens = 0;
            l.granted = false;
            l.starved = false;
            l.pending = true;
        }
        out
    }

    /// Redis's answer to a relet: `[held, slots, requests, tokens, nanos
    /// granted, the minute's requests, its tokens, second]`.
    pub fn apply(&self, r: &Relet, answer: &[i64], now: Instant) {
        let mut map = self.lock();
        let Some(l) = map.get_mut(&r.caller).filter(|l| l.epoch == r.epoch) else {
            return;
        };
        let n = |i: usize| answer.get(i).map_or(0, |&v| v.max(0) as u64);
        let g = Amounts {
            slots: n(1),
            reqs: n(2),
            tokens: n(3),
            nanos: n(4).min(i64::MAX as u64) as i64,
        };
        let granted = g != Amounts::default();
        l.pending = false;
        l.taken = Some(now);
        l.life = life();
        l.known = (n(5), n(6));
        l.granted = granted;
        l.held = (n(0) == 1).then(|| Held {
            suffix: r.suffix(g),
            second: n(7),
            reqs: g.reqs,
            tokens: g.tokens,
        });
        if granted {
            // Slots given back while the relet was out stay usable: the
            // new ticket holds them as in flight.
            let slots = l.left.slots + g.slots;
            l.left = Amounts { slots, ..g };
        } else {
            l.left = Amounts {
                slots: if l.held.is_some() { l.left.slots } else { 0 },
                ..Amounts::default()
            };
        }
    }

    /// Relets Redis did not take: their leases are dropped (Redis frees
    /// them by their deadline) and their callers take the exact path; they
    /// are not asked again for a lease's life.
    pub fn lost(&self, relets: &[Relet], now: Instant) {
        let mut map = self.lock();
        for r in relets {
            if let Some(l) = map.get_mut(&r.caller).filter(|l| l.epoch == r.epoch) {
                l.lose();
                l.taken = Some(now);
                l.life = life();
            }
        }
    }

    /// Redis is out: no lease admits until it is relet.
    pub fn pause(&self) {
        for l in self.lock().values_mut() {
            l.left = Amounts::default();
            l.granted = false;
            l.taken = None;
        }
    }

    /// Every lease given back, nothing new taken: for shutdown.
    pub fn release(&self, seq: &AtomicU64) -> Vec<Relet> {
        let mut map = self.lock();
        let mut out = Vec::new();
        for (caller, l) in map.iter_mut() {
            if l.held.is_none() || l.pending {
                continue;
            }
            out.push(Relet {
                caller: caller.clone(),
                epoch: l.epoch,
                old: l.held.clone(),
                used_reqs: l.used_reqs,
                used_tokens: l.used_tokens,
                seq: seq.fetch_add(1, Ordering::Relaxed),
                want: Amounts::default(),
                in_flight: l.in_flight,
                limits: l.limits.clone(),
            });
            l.gen += 1;
            l.left = Amounts::default();
            l.granted = false;
            l.pending = true;
        }
        out
    }

    /// The tickets of held leases, per caller, as the heartbeat refreshes
    /// them (`lease:<suffix>`).
    pub fn tickets(&self) -> Vec<(Arc<str>, String)> {
        self.lock()
            .iter()
            .filter_map(|(c, l)| {
                l.held
                    .as_ref()
                    .map(|h| (c.clone(), format!("lease:{}", h.suffix)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CallerLimits {
        CallerLimits {
            rpm: Some(1_000_000),
            concurrency: Some(1000),
            ..Default::default()
        }
    }

    /// Busy enough, a caller is relet; the lease admits what it holds and
    /// no more, and slots come back as requests end.
    #[test]
    fn a_lease_admits_what_it_holds() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        for _ in 0..MIN_USE {
            assert!(leases.take(&c, &limits(), cost).is_none());
            leases.admitted(&c);
            leases.settle("c", None, cost, cost);
        }
        let now = Instant::now();
        let plan = leases.plan(now, &seq, RELETS_PER_TICK);
        assert_eq!(plan.len(), 1);
        let r = &plan[0];
        assert_eq!(r.want.reqs, 2 * MIN_USE);
        assert!(r.old.is_none());
        leases.apply(r, &[1, r.want.slots as i64, 16, 0, 0, 16, 0, 100], now);
        let mut marks = Vec::new();
        let slots = r.want.slots;
        for _ in 0..slots {
            marks.push(leases.take(&c, &limits(), cost).unwrap().0);
        }
        // Every slot taken: the next one goes the exact way.
        assert!(leases.take(&c, &limits(), cost).is_none());
        leases.settle("c", Some(marks[0]), cost, cost);
        assert!(leases.take(&c, &limits(), cost).is_some());
        // Relet: what is in flight is held by the new ticket.
        let plan = leases.plan(now + 2 * LIFE, &seq, RELETS_PER_TICK);
        let r = &plan[0];
        assert_eq!(r.in_flight.slots, slots);
        assert_eq!(r.old.as_ref().unwrap().reqs, 2 * MIN_USE);
        assert_eq!(r.used_reqs, marks.len() as u64 + 1);
    }

    /// A relet Redis did not grant leaves only what is in flight held, and
    /// nothing more is admitted from it.
    #[test]
    fn a_refused_lease_admits_nothing() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        for _ in 0..MIN_USE {
            leases.take(&c, &limits(), cost);
        }
        let now = Instant::now();
        let plan = leases.plan(now, &seq, RELETS_PER_TICK);
        leases.apply(&plan[0], &[0, 0, 0, 0, 0, 0, 0, 100], now);
        assert!(leases.take(&c, &limits(), cost).is_none());
        assert!(leases.tickets().is_empty());
    }

    /// A relet Redis did not take drops only that lease: its caller goes
    /// the exact way and is not asked again before a lease's life.
    #[test]
    fn a_lost_relet_drops_only_its_lease() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let cost = Cost::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..MIN_USE {
            leases.take(&a, &limits(), cost);
            leases.take(&b, &limits(), cost);
        }
        let now = Instant::now();
        let plan = leases.plan(now, &seq, RELETS_PER_TICK);
        assert_eq!(plan.len(), 2);
        let (ra, rb) = if *plan[0].caller == *"a" {
            (&plan[0], &plan[1])
        } else {
            (&plan[1], &plan[0])
        };
        leases.apply(rb, &[1, 8, 64, 0, 0, 64, 0, 100], now);
        leases.lost(std::slice::from_ref(ra), now);
        assert!(leases.take(&a, &limits(), cost).is_none());
        assert!(leases.take(&b, &limits(), cost).is_some());
        assert_eq!(leases.tickets().len(), 1);
        for _ in 0..MIN_USE {
            leases.take(&a, &limits(), cost);
        }
        assert!(leases.plan(now + TICK, &seq, RELETS_PER_TICK).is_empty());
        let later = leases.plan(now + 2 * LIFE, &seq, RELETS_PER_TICK);
        assert!(later.iter().any(|r| *r.caller == *"a" && r.old.is_none()));
    }

    /// No more relets than asked go out in one tick; those left out are
    /// relet at the next.
    #[test]
    fn relets_per_tick_are_capped() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let cost = Cost::default();
        let callers: Vec<Arc<str>> = ["a", "b", "c"].map(Arc::from).to_vec();
        for c in &callers {
            for _ in 0..MIN_USE {
                leases.take(c, &limits(), cost);
            }
        }
        let now = Instant::now();
        let first = leases.plan(now, &seq, 2);
        assert_eq!(first.len(), 2);
        let second = leases.plan(now + TICK, &seq, 2);
        assert_eq!(second.len(), 1);
        assert!(first.iter().all(|r| r.caller != second[0].caller));
    }

    /// Leases answered at once are relet over a spread of times, within
    /// 0.75 to 1.25 of [`LIFE`].
    #[test]
    fn lease_lives_are_spread() {
        let lives: Vec<Duration> = (0..200).map(|_| life()).collect();
        assert!(lives
            .iter()
            .all(|l| *l >= LIFE * 3 / 4 && *l <= LIFE * 5 / 4));
        assert!(lives.iter().any(|l| *l < LIFE * 9 / 10));
        assert!(lives.iter().any(|l| *l > LIFE * 11 / 10));
    }
}
