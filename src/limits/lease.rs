//! Headroom leases: a caller's allowance taken from Redis in chunks, so that
//! an instance admits most requests with no Redis work at all.
//!
//! When a caller is busy on this instance (at least [`MIN_USE`] admissions
//! in the last second, or that busy within [`REMEMBER`]) and every one of
//! its limits has plenty of room, it takes a **lease** in one script item
//! — asked for by the admission that finds it busy without one
//! ([`Leases::ask`], which waits for it and is admitted from it), then
//! relet by the lease keeper ([`super::shared::SharedState`]'s
//! `keep_leases`): this instance's demand of the last second
//! for the lease's life and one second more (requests for `rpm`, tokens
//! for `tpm` and token budgets, nano-dollars for USD budgets; slots for
//! `concurrency`: twice the most in flight, and two). Redis counts it at
//! once as used and reserved — the requests and tokens in the current
//! second of the rolling minute, the slots and budget amounts as one ticket
//! of the caller with a deadline, refreshed by the heartbeat like any other
//! — so the total across instances can never pass a limit. Requests are
//! then admitted here, under one short lock, from what the lease has left:
//! admission never waits on Redis while the lease lasts.
//!
//! Room is plenty when each limit has at least [`ROOM`] × `replicas` times
//! the lease left; otherwise Redis grants what room there is (down to an
//! eighth of the ask) or nothing, and every request takes the exact path
//! (one script item per admission and per settle), so small limits and
//! limits nearly reached stay exact to the request.
//!
//! A lease lives [`LIFE`] for a busy caller, [`THIN_LIFE`] for a thin one
//! (under [`THIN`] admissions a second: half the relets, for a lease that
//! is still a few seconds of its demand), spread 0.75 to 1.25 of that at
//! random so that leases taken together are not relet together; it is
//! relet sooner when what it has left falls under two ticks of demand (the
//! low-water mark), so that a burst does not run it dry. The keeper sends
//! [`RELETS_PER_TICK`] relets per tick at most, the longest waiting first,
//! in calls of [`RELETS_PER_CALL`]. A relet gives the old lease back and
//! takes the next in one script item: the requests and tokens it did not
//! use leave the second they were counted in, and its ticket is replaced by
//! the new lease's (which also holds the slots and budget amounts of
//! requests admitted from the old one and still in flight).
//!
//! While a relet is out, the caller is admitted from its **carry**: a tick
//! of demand kept from what the old lease had left, which the same script
//! item counts anew as part of the new lease whatever else Redis grants.
//! So no request waits on a relet, and none is counted zero times; what
//! the carry does not admit goes back with the new lease. A relet Redis
//! does not take within `timeout` (a [`TICK`] at least: no request waits
//! on it) drops that lease only (its caller takes
//! the exact path until the next one). A lease whose caller went quiet is
//! kept [`WARM`] (relet at the caller's remembered demand, so that a
//! pause of seconds costs its next request no round trip), then given
//! back. A crashed instance's lease frees its slots and budget
//! amounts at its deadline; the requests and tokens it did not use stay
//! counted in the minute they were taken in (never too few).
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
/// How long a busy caller's lease is used before it is given back and
/// taken anew, on average ([`life`] spreads it).
pub const LIFE: Duration = Duration::from_secs(1);
/// The same for a thin caller (fewer than [`THIN`] admissions a second
/// here): twice as long, so that a thousand such callers cost Redis half
/// the relets; its lease is that much larger against its rate.
pub const THIN_LIFE: Duration = Duration::from_secs(2);
/// Admissions a second below which a caller is thin.
pub const THIN: u64 = 64;
/// Admissions of a caller in the last second on this instance before it
/// leases: below that, the exact path costs Redis little. The admission
/// that reaches it asks for the lease ([`Leases::ask`]) and is admitted
/// from it, and a caller seen that busy in the last [`REMEMBER`] asks
/// with its first admission, for its remembered demand: a new caller
/// takes the exact path once, a returning one not at all.
pub const MIN_USE: u64 = 2;
/// How long a caller's demand is remembered after it went quiet.
pub const REMEMBER: Duration = Duration::from_secs(60);
/// How long a held lease is kept, relet at the caller's remembered
/// demand, after the caller went quiet: a pause of seconds (a client
/// thinking between calls) does not cost the next request a round trip
/// to Redis. Longer than that, the lease is given back.
pub const WARM: Duration = Duration::from_secs(20);
/// A held lease not relet for this long has its deadline pushed forward
/// by the heartbeat (a relet gives it a new one).
pub const STALE: Duration = Duration::from_secs(3);
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

/// The mean life of a lease for a caller with `reqs` admissions in the
/// last second here.
fn mean_life(reqs: u64) -> Duration {
    if reqs < THIN {
        THIN_LIFE
    } else {
        LIFE
    }
}

/// A lease's life: 0.75 to 1.25 times `mean`, at random, so that the
/// relets of leases taken in the same tick spread over a quarter of it
/// either way.
fn life(mean: Duration) -> Duration {
    mean.mul_f64(0.75 + fastrand::f64() / 2.0)
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
    /// The mean life of the lease asked for.
    life: Duration,
    /// The requests and tokens kept from the old lease to admit while the
    /// relet is out: given back with the old one and counted anew, in
    /// the same script item, as part of the new one, granted or not.
    pub carry: Amounts,
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
    /// Requests, tokens and nanos kept from the old lease when it was
    /// relet, part of the new one whatever Redis grants (see
    /// [`Relet::carry`]): what admits while the relet is out, and first
    /// after. `slots` is unused (the slots kept stay in `left`).
    carry: Amounts,
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
    /// The busiest second's demand seen while it leased, and when it was
    /// last asked for anything: a returning caller's first lease is sized
    /// by it.
    rate: Demand,
    seen: Option<Instant>,
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

    /// What to ask for a caller with demand `d` (its recent peak when
    /// larger, fading: a caller back from a pause asks at once for what it
    /// used), and the lease's mean life: its life and one second more of
    /// it.
    fn want(&self, d: Demand) -> (Amounts, Duration) {
        let r = self.rate;
        let d = Demand {
            reqs: d.reqs.max(r.reqs),
            tokens: d.tokens.max(r.tokens),
            nanos: d.nanos.max(r.nanos),
            peak: d.peak.max(r.peak),
        };
        let lim = &self.limits;
        let mean = mean_life(d.reqs);
        let times = 1 + mean.as_secs();
        let want = Amounts {
            reqs: if lim.rpm.is_some() { times * d.reqs } else { 0 },
            slots: if lim.concurrency.is_some() {
                2 * d.peak + 2
            } else {
                0
            },
            tokens: if lim.tpm.is_some() || lim.budget_tokens.is_some() {
                d.tokens.saturating_mul(times).max(1)
            } else {
                0
            },
            nanos: if lim.budget_usd.is_some() {
                d.nanos.saturating_mul(times as i64)
            } else {
                0
            },
        };
        (want, mean)
    }

    /// Starts a relet of this lease for `caller`: asks for `want` and
    /// stops the old lease (see [`Leases::plan`]).
    fn relet(
        &mut self,
        caller: Arc<str>,
        want: Amounts,
        d: Demand,
        mean: Duration,
        seq: &AtomicU64,
    ) -> Relet {
        let l = self;
        // The carry: a tick of demand kept from what the lease (and
        // its carry) has left, for the requests that come while the
        // relet is out. Redis gives it back with the old lease and
        // counts it anew in the new one in the same step (its slots
        // and budget amounts held as in flight), so what it admits is
        // never counted zero times, and what it does not goes back
        // with the new lease.
        let keep = if l.granted && want != Amounts::default() {
            let tick = |n: u64| n.div_ceil(TICKS as u64);
            let (a, c) = (l.left, l.carry);
            Amounts {
                reqs: (a.reqs + c.reqs).min(tick(d.reqs)),
                slots: a.slots.min(tick(d.reqs.max(d.peak)) + 1),
                tokens: a.tokens.saturating_add(c.tokens).min(tick(d.tokens)),
                nanos: a
                    .nanos
                    .saturating_add(c.nanos)
                    .min(tick(d.nanos.max(0) as u64) as i64),
            }
        } else {
            Amounts::default()
        };
        let f = l.in_flight;
        let r = Relet {
            caller,
            epoch: l.epoch,
            old: l.held.clone(),
            used_reqs: l.used_reqs,
            used_tokens: l.used_tokens,
            seq: seq.fetch_add(1, Ordering::Relaxed),
            want,
            in_flight: Amounts {
                reqs: f.reqs,
                slots: f.slots + keep.slots,
                tokens: f.tokens.saturating_add(keep.tokens),
                nanos: f.nanos.saturating_add(keep.nanos),
            },
            limits: l.limits.clone(),
            life: mean,
            carry: keep,
        };
        // The old lease stops here (what was left of its carry with
        // it); its slots in flight stay held. What the carry admits
        // counts as used of the new one.
        l.gen += 1;
        l.left = Amounts {
            slots: keep.slots,
            ..Amounts::default()
        };
        l.carry = Amounts { slots: 0, ..keep };
        l.used_reqs = 0;
        l.used_tokens = 0;
        l.granted = false;
        l.starved = false;
        l.pending = true;
        r
    }

    /// Drops the lease: what it held frees itself in Redis by its deadline.
    fn lose(&mut self) {
        self.epoch += 1;
        self.held = None;
        self.granted = false;
        self.left = Amounts::default();
        self.carry = Amounts::default();
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
        let slot = limits.concurrency.is_some();
        // Whether `a` has the request's requests, tokens and nanos.
        let covers = |a: Amounts| {
            (limits.rpm.is_none() || a.reqs > 0)
                && ((limits.tpm.is_none() && limits.budget_tokens.is_none())
                    || a.tokens >= cost.tokens)
                && (limits.budget_usd.is_none() || a.nanos >= cost.nanos.max(0))
        };
        let slot_free = !slot || l.left.slots > 0;
        // The carry first (it admits while a relet is out), then the lease.
        let carried = slot_free && covers(l.carry);
        if !carried {
            if !l.granted || l.pending {
                return None;
            }
            if !slot_free || !covers(l.left) {
                l.starved = true;
                return None;
            }
        }
        let less = |a: Amounts| Amounts {
            reqs: a.reqs.saturating_sub(1),
            slots: a.slots,
            tokens: a.tokens.saturating_sub(cost.tokens),
            nanos: a.nanos.saturating_sub(cost.nanos.max(0)).max(0),
        };
        if carried {
            l.carry = less(l.carry);
        } else {
            l.left = less(l.left);
        }
        l.used_reqs += 1;
        l.used_tokens = l.used_tokens.saturating_add(cost.tokens);
        l.left.slots -= u64::from(slot);
        l.in_flight.reqs += 1;
        l.in_flight.slots += u64::from(slot);
        l.in_flight.tokens = l.in_flight.tokens.saturating_add(cost.tokens);
        l.in_flight.nanos = l.in_flight.nanos.saturating_add(cost.nanos.max(0));
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
    /// on by a tick and forgets callers with nothing held, nothing asked
    /// and no demand to remember.
    pub fn plan(&self, now: Instant, seq: &AtomicU64, most: usize) -> Vec<Relet> {
        let mut map = self.lock();
        map.retain(|_, l| {
            l.held.is_some()
                || l.pending
                || l.busy > 0
                || l.demand().reqs > 0
                || l.seen.is_some_and(|t| now.duration_since(t) < REMEMBER)
        });
        let mut due = Vec::new();
        for (caller, l) in map.iter_mut() {
            let d = l.demand();
            l.tick = (l.tick + 1) % TICKS;
            l.demand[l.tick] = Demand {
                peak: l.busy,
                ..Demand::default()
            };
            if d.reqs > 0 {
                // A peak that fades by a sixteenth a tick (by half in
                // under three seconds) while the caller is asking, and is
                // kept while it is quiet: the second in which a caller
                // stops does not take its rate down with it.
                let r = l.rate;
                let fade = |n: u64| n - n / 16;
                l.rate = Demand {
                    reqs: d.reqs.max(fade(r.reqs)),
                    tokens: d.tokens.max(fade(r.tokens)),
                    nanos: d.nanos.max(fade(r.nanos.max(0) as u64) as i64),
                    peak: d.peak.max(fade(r.peak)),
                };
                l.seen = Some(now);
            }
            if l.pending {
                continue;
            }
            if l.held.is_none() {
                // Nothing holds what its carry was counted with any more.
                l.carry = Amounts::default();
            }
            // Busy in the last second, or holding a lease and busy within
            // [`WARM`]: then the lease is kept, sized by the remembered
            // demand ([`Lease::want`]).
            let warm = l.held.is_some()
                && l.rate.reqs >= MIN_USE
                && l.seen.is_some_and(|t| now.duration_since(t) < WARM);
            let wants = d.reqs >= MIN_USE || warm;
            let old_enough = l.taken.is_none_or(|t| now.duration_since(t) >= l.life);
            let lim = &l.limits;
            // Low water: less left than two ticks of demand. Relet now, so
            // that the new lease is there before this one runs dry.
            let low = |left: u64, per_second: u64| {
                left.saturating_mul(TICKS as u64) < per_second.saturating_mul(2)
            };
            let low_water = l.granted
                && ((lim.rpm.is_some() && low(l.left.reqs, d.reqs))
                    || ((lim.tpm.is_some() || lim.budget_tokens.is_some())
                        && low(l.left.tokens, d.tokens))
                    || (lim.budget_usd.is_some()
                        && low(l.left.nanos.max(0) as u64, d.nanos.max(0) as u64)));
            let is_due = match (&l.held, wants) {
                (None, false) => false,
                (None, true) => old_enough,
                // Given back once nothing it holds is in flight.
                (Some(_), false) => l.granted || l.in_flight.reqs == 0,
                (Some(_), true) => old_enough || low_water || (l.starved && l.granted),
            };
            if !is_due {
                continue;
            }
            let (want, mean) = if wants {
                l.want(d)
            } else {
                (Amounts::default(), mean_life(d.reqs))
            };
            due.push((l.taken, caller.clone(), want, d, mean));
        }
        // Never answered first, then the oldest answer.
        due.sort_unstable_by_key(|(taken, ..)| *taken);
        due.truncate(most);
        let mut out = Vec::with_capacity(due.len());
        for (_, caller, want, d, mean) in due {
            let Some(l) = map.get_mut(&caller) else {
                continue;
            };
            out.push(l.relet(caller, want, d, mean, seq));
        }
        out
    }

    /// A lease asked for by an admission of `caller` that found none (it
    /// waits for Redis's answer, then takes from it): when the caller
    /// holds no lease (nor has one asked for), was refused none within a
    /// lease's life, and has asked for [`MIN_USE`] in the last second, or
    /// was that busy within [`REMEMBER`] (then sized by that).
    pub fn ask(&self, caller: &Arc<str>, now: Instant, seq: &AtomicU64) -> Option<Relet> {
        let mut map = self.lock();
        let l = map.get_mut(caller)?;
        if l.held.is_some() || l.pending || l.demand().reqs.max(l.rate.reqs) < MIN_USE {
            return None;
        }
        if l.taken.is_some_and(|t| now.duration_since(t) < l.life) {
            return None;
        }
        let d = l.demand();
        let (want, mean) = l.want(d);
        Some(l.relet(caller.clone(), want, d, mean, seq))
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
        // A lease given back (nothing asked) does not hold the caller's
        // next one off; one asked for and refused does, for its life.
        l.taken = (r.want != Amounts::default()).then_some(now);
        l.life = life(r.life);
        l.known = (n(5), n(6));
        l.granted = granted;
        l.held = (n(0) == 1).then(|| Held {
            suffix: r.suffix(g),
            second: n(7),
            reqs: g.reqs + r.carry.reqs,
            tokens: g.tokens.saturating_add(r.carry.tokens),
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
                l.life = life(r.life);
            }
        }
    }

    /// Redis is out: no lease admits until it is relet.
    pub fn pause(&self) {
        for l in self.lock().values_mut() {
            l.left = Amounts::default();
            l.carry = Amounts::default();
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
                life: LIFE,
                carry: Amounts::default(),
            });
            l.gen += 1;
            l.left = Amounts::default();
            l.carry = Amounts::default();
            l.granted = false;
            l.pending = true;
        }
        out
    }

    /// The tickets of held leases Redis last answered for before `stale`
    /// (all with `None`), per caller, as the heartbeat refreshes them
    /// (`lease:<suffix>`): a relet gives its ticket a deadline of its own.
    pub fn tickets(&self, stale: Option<Instant>) -> Vec<(Arc<str>, String)> {
        self.lock()
            .iter()
            .filter(|(_, l)| match (stale, l.taken) {
                (Some(stale), Some(taken)) => taken <= stale,
                _ => true,
            })
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

    /// Admissions asked for before a first lease in these tests (at least
    /// [`MIN_USE`]).
    const ASKED: u64 = 8;

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
        for _ in 0..ASKED {
            assert!(leases.take(&c, &limits(), cost).is_none());
            leases.admitted(&c);
            leases.settle("c", None, cost, cost);
        }
        let now = Instant::now();
        let plan = leases.plan(now, &seq, RELETS_PER_TICK);
        assert_eq!(plan.len(), 1);
        let r = &plan[0];
        // A thin caller: a lease for its life and a second more.
        assert_eq!(r.want.reqs, 3 * ASKED);
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
        let plan = leases.plan(now + 2 * THIN_LIFE, &seq, RELETS_PER_TICK);
        let r = &plan[0];
        assert_eq!(r.in_flight.slots, slots);
        assert_eq!(r.old.as_ref().unwrap().reqs, 16);
        assert_eq!(r.used_reqs, marks.len() as u64 + 1);
        // A tick of the last second's 14 asked for, kept as the carry.
        assert_eq!(r.carry.reqs, 4);
    }

    fn rpm_only() -> CallerLimits {
        CallerLimits {
            rpm: Some(1_000_000),
            ..Default::default()
        }
    }

    /// Leased once, with `granted` requests: the caller asked for MIN_USE
    /// in the last second.
    fn leased(leases: &Leases, seq: &AtomicU64, c: &Arc<str>, granted: i64, now: Instant) {
        for _ in 0..ASKED {
            assert!(leases.take(c, &rpm_only(), Cost::default()).is_none());
        }
        let plan = leases.plan(now, seq, RELETS_PER_TICK);
        let g = granted;
        leases.apply(&plan[0], &[1, 0, g, 0, 0, g, 0, 100], now);
    }

    /// While a relet is out, requests are admitted from its carry and no
    /// more; the carry is part of the new lease, spent first.
    #[test]
    fn a_relet_out_admits_from_its_carry() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        let now = Instant::now();
        leased(&leases, &seq, &c, 24, now);
        for _ in 0..4 {
            assert!(leases.take(&c, &rpm_only(), cost).is_some());
        }
        let plan = leases.plan(now + 2 * THIN_LIFE, &seq, RELETS_PER_TICK);
        assert_eq!(plan.len(), 1);
        let r = &plan[0];
        assert_eq!(r.used_reqs, 4);
        // Twelve asked for in the last second: a tick of it is 3.
        assert_eq!(r.carry.reqs, 3);
        let mut carried = Vec::new();
        for _ in 0..3 {
            let (mark, _) = leases.take(&c, &rpm_only(), cost).expect("from the carry");
            carried.push(mark);
        }
        assert!(leases.take(&c, &rpm_only(), cost).is_none());
        leases.apply(r, &[1, 0, 30, 0, 0, 30, 0, 101], now + 2 * THIN_LIFE);
        for m in carried {
            leases.settle("c", Some(m), cost, cost);
        }
        for _ in 0..29 {
            assert!(leases.take(&c, &rpm_only(), cost).is_some());
        }
        // The new lease: 30 granted and the carry of 3, one left of it.
        let plan = leases.plan(now + 4 * THIN_LIFE, &seq, RELETS_PER_TICK);
        assert_eq!(plan[0].old.as_ref().unwrap().reqs, 33);
        assert_eq!(plan[0].used_reqs, 32);
    }

    /// A lease with less left than two ticks of demand is relet before its
    /// life is over; one with plenty left is not.
    #[test]
    fn a_lease_is_relet_at_low_water() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        let now = Instant::now();
        leased(&leases, &seq, &c, 24, now);
        for _ in 0..2 {
            assert!(leases.take(&c, &rpm_only(), cost).is_some());
        }
        assert!(leases.plan(now + TICK, &seq, RELETS_PER_TICK).is_empty());
        for _ in 0..18 {
            assert!(leases.take(&c, &rpm_only(), cost).is_some());
        }
        let plan = leases.plan(now + 2 * TICK, &seq, RELETS_PER_TICK);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].old.as_ref().unwrap().reqs, 24);
    }

    /// A relet Redis did not grant leaves only what is in flight held, and
    /// nothing more is admitted from it.
    #[test]
    fn a_refused_lease_admits_nothing() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        for _ in 0..ASKED {
            leases.take(&c, &limits(), cost);
        }
        let now = Instant::now();
        let plan = leases.plan(now, &seq, RELETS_PER_TICK);
        leases.apply(&plan[0], &[0, 0, 0, 0, 0, 0, 0, 100], now);
        assert!(leases.take(&c, &limits(), cost).is_none());
        assert!(leases.tickets(None).is_empty());
    }

    /// A relet Redis did not take drops only that lease: its caller goes
    /// the exact way and is not asked again before a lease's life.
    #[test]
    fn a_lost_relet_drops_only_its_lease() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let cost = Cost::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..ASKED {
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
        assert_eq!(leases.tickets(None).len(), 1);
        for _ in 0..ASKED {
            leases.take(&a, &limits(), cost);
        }
        assert!(leases.plan(now + TICK, &seq, RELETS_PER_TICK).is_empty());
        let later = leases.plan(now + 2 * THIN_LIFE, &seq, RELETS_PER_TICK);
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
            for _ in 0..ASKED {
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

    /// The admission that reaches [`MIN_USE`] without a lease asks for
    /// one (to go in its own script call), once; a caller with a lease,
    /// or one asked for, asks for none.
    #[test]
    fn the_admission_reaching_min_use_asks_for_a_lease() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        for _ in 0..MIN_USE - 1 {
            assert!(leases.take(&c, &rpm_only(), cost).is_none());
            assert!(leases.ask(&c, Instant::now(), &seq).is_none());
        }
        assert!(leases.take(&c, &rpm_only(), cost).is_none());
        let r = leases
            .ask(&c, Instant::now(), &seq)
            .expect("a lease asked for");
        assert_eq!(r.want.reqs, 3 * MIN_USE);
        assert!(r.old.is_none());
        // Asked once: the next exact admissions ask for nothing more.
        assert!(leases.take(&c, &rpm_only(), cost).is_none());
        assert!(leases.ask(&c, Instant::now(), &seq).is_none());
        assert!(leases
            .plan(Instant::now(), &seq, RELETS_PER_TICK)
            .is_empty());
        let now = Instant::now();
        let g = r.want.reqs as i64;
        leases.apply(&r, &[1, 0, g, 0, 0, g, 0, 100], now);
        assert!(leases.take(&c, &rpm_only(), cost).is_some());
        assert!(leases.ask(&c, Instant::now(), &seq).is_none());
    }

    /// A caller back after a pause asks at once for the demand it had
    /// before (its lease was given back meanwhile), not for the little it
    /// has asked since it came back.
    #[test]
    fn a_returning_caller_asks_for_its_remembered_demand() {
        let leases = Leases::default();
        let seq = AtomicU64::new(0);
        let c: Arc<str> = "c".into();
        let cost = Cost::default();
        let now = Instant::now();
        leased(&leases, &seq, &c, 24, now);
        for _ in 0..40 {
            leases.take(&c, &rpm_only(), cost);
        }
        // Busy for a second: 48 asked (8 before the lease, 40 after).
        let plan = leases.plan(now + 2 * THIN_LIFE, &seq, RELETS_PER_TICK);
        assert_eq!(plan[0].want.reqs, 3 * 48);
        let g = plan[0].want.reqs as i64;
        leases.apply(&plan[0], &[1, 0, g, 0, 0, g, 0, 101], now + 2 * THIN_LIFE);
        // Quiet: kept warm (relet at the remembered demand) for
        // [`WARM`] after the last busy tick, then given back, then
        // nothing asked of Redis.
        let last_busy = now + 2 * THIN_LIFE;
        let mut t = last_busy;
        let (mut warm, mut gave_back) = (0, None);
        while t < last_busy + WARM + 2 * THIN_LIFE {
            t += TICK;
            for r in leases.plan(t, &seq, RELETS_PER_TICK) {
                assert!(gave_back.is_none(), "asked of Redis after giving back");
                if r.want == Amounts::default() {
                    leases.apply(&r, &[0, 0, 0, 0, 0, 0, 0, 102], t);
                    gave_back = Some(t);
                } else {
                    assert_eq!(r.want.reqs, 3 * 45);
                    // Busy last seen within the demand's second.
                    let seen_by = last_busy + TICK * (TICKS as u32 + 1);
                    assert!(t < seen_by + WARM, "kept warm too long");
                    let g = r.want.reqs as i64;
                    leases.apply(&r, &[1, 0, g, 0, 0, g, 0, 102], t);
                    warm += 1;
                }
            }
        }
        assert!(warm > 0, "not kept warm");
        assert!(gave_back.is_some_and(|g| g >= last_busy + WARM));
        assert!(leases.tickets(None).is_empty());
        // Back: its first admission asks for what it used to (45 a
        // second: its peak of 48 less a sixteenth, faded once as the
        // busiest tick left the last second).
        assert!(leases.take(&c, &rpm_only(), cost).is_none());
        let r = leases
            .ask(&c, t + 2 * THIN_LIFE, &seq)
            .expect("a lease asked for");
        assert_eq!(r.want.reqs, 3 * 45);
    }

    /// Leases answered at once are relet over a spread of times, within
    /// 0.75 to 1.25 of [`LIFE`].
    #[test]
    fn lease_lives_are_spread() {
        let lives: Vec<Duration> = (0..200).map(|_| life(LIFE)).collect();
        assert!(lives
            .iter()
            .all(|l| *l >= LIFE * 3 / 4 && *l <= LIFE * 5 / 4));
        assert!(lives.iter().any(|l| *l < LIFE * 9 / 10));
        assert!(lives.iter().any(|l| *l > LIFE * 11 / 10));
    }
}
