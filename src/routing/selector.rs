//! Candidate order for one request: priority tiers, smooth weighted round
//! robin (or, with `balance: latency`, the better of two weighted random
//! picks by time to first byte) inside a tier, the others of the tier as
//! its failovers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use smallvec::SmallVec;

/// Client indices in the order to try them.
pub type Order = SmallVec<[usize; 4]>;

/// The candidates for one model name, cached in the routing table.
#[derive(Debug, Default)]
pub struct Candidates {
    pub tiers: Vec<Tier>,
}

/// Clients of one priority.
#[derive(Debug)]
pub struct Tier {
    pub priority: i64,
    /// Client indexes in file order.
    pub members: Vec<usize>,
    pub weights: Vec<u32>,
    /// Smooth WRR state (nginx's algorithm): one running weight per member.
    current: Mutex<Vec<i64>>,
}

impl Candidates {
    /// Groups client indexes (already sorted by priority) into tiers.
    pub fn new(
        sorted: &[usize],
        priority: impl Fn(usize) -> i64,
        weight: impl Fn(usize) -> u32,
    ) -> Self {
        let mut tiers: Vec<Tier> = Vec::new();
        for &i in sorted {
            let p = priority(i);
            match tiers.last_mut() {
                Some(t) if t.priority == p => {
                    t.members.push(i);
                    t.weights.push(weight(i));
                }
                _ => tiers.push(Tier {
                    priority: p,
                    members: vec![i],
                    weights: vec![weight(i)],
                    current: Mutex::new(Vec::new()),
                }),
            }
        }
        for t in &mut tiers {
            *t.current.get_mut().unwrap_or_else(|e| e.into_inner()) = vec![0; t.members.len()];
        }
        Candidates { tiers }
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    /// Every candidate once, in the order to try them for the next request.
    /// Inline for up to four: most models have one or two clients, and the
    /// list is made for every request.
    pub fn order(&self) -> Order {
        self.order_with(|_| None)
    }

    /// As [`Candidates::order`], but `first` may choose the member (its
    /// position in the tier) that leads a tier; `None` keeps smooth WRR.
    pub fn order_with(&self, mut first: impl FnMut(&Tier) -> Option<usize>) -> Order {
        let mut out = Order::new();
        for t in &self.tiers {
            if t.members.len() == 1 {
                out.push(t.members[0]);
                continue;
            }
            let lead = first(t)
                .filter(|&i| i < t.members.len())
                .unwrap_or_else(|| t.pick());
            t.order_into(lead, &mut out);
        }
        out
    }

    /// Every candidate in priority then file order (no traffic sharing).
    pub fn in_priority_order(&self) -> impl Iterator<Item = usize> + '_ {
        self.tiers.iter().flat_map(|t| t.members.iter().copied())
    }
}

impl Tier {
    fn order_into(&self, first: usize, out: &mut Order) {
        out.push(self.members[first]);
        // The rest fail over in descending weight, file order among equals.
        let mut rest: Vec<usize> = (0..self.members.len()).filter(|&i| i != first).collect();
        rest.sort_by_key(|&i| std::cmp::Reverse(self.weights[i]));
        out.extend(rest.into_iter().map(|i| self.members[i]));
    }

    /// Smooth weighted round robin: each member gains its weight, the
    /// largest wins and pays back the total. Spreads picks evenly in time.
    fn pick(&self) -> usize {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = self.weights.iter().map(|&w| i64::from(w)).sum();
        let mut best = 0;
        for (i, w) in self.weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }
}

/// Of every (1 in this many) latency picks, one is a plain weighted draw,
/// so that a slow client still gets a few requests and its average can
/// come down again.
const PROBE_ONE_IN: u32 = 20;

/// Power of two choices: two members drawn by weight, the one whose `cost`
/// is lower wins; one pick in [`PROBE_ONE_IN`] takes the first draw as it is.
pub fn two_choices(weights: &[u32], cost: impl Fn(usize) -> f64) -> usize {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let draw = || {
        let mut at = fastrand::u64(..total.max(1));
        for (i, &w) in weights.iter().enumerate() {
            if at < u64::from(w) {
                return i;
            }
            at -= u64::from(w);
        }
        0
    };
    let a = draw();
    if weights.len() < 2 || fastrand::u32(..PROBE_ONE_IN) == 0 {
        return a;
    }
    // A second, different member: a few redraws, then the next one along.
    let b = (0..4)
        .map(|_| draw())
        .find(|&b| b != a)
        .unwrap_or((a + 1) % weights.len());
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}

/// How fast the average forgets: a sample this old counts for 1/e.
const DECAY: Duration = Duration::from_secs(10);

/// `e^-x` for `x >= 0`. Under load samples come microseconds apart, where
/// `x` is below 1e-3 and four terms of the series are exact to well under
/// an `f64`'s rounding (the next term is below 1e-17): no libm call per
/// request.
fn decay(x: f64) -> f64 {
    if x < 1e-3 {
        1.0 - x * (1.0 - x / 2.0 * (1.0 - x / 3.0 * (1.0 - x / 4.0)))
    } else {
        (-x).exp()
    }
}

fn clock_base() -> tokio::time::Instant {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    *BASE.get_or_init(tokio::time::Instant::now)
}

/// A client's decaying average of time to first byte on this instance
/// (as linkerd's EWMA: older samples weigh less by their age, not by their
/// count). Lock-free; a race between two samples loses one of them.
#[derive(Debug, Default)]
pub struct TtfbAverage {
    /// Microseconds, as `f64` bits; 0 until the first sample.
    micros: AtomicU64,
    /// When the last sample came, in microseconds on the process clock.
    at: AtomicU64,
}

impl TtfbAverage {
    pub fn record(&self, sample: Duration) {
        self.record_at(sample, tokio::time::Instant::now().into_std());
    }

    /// [`TtfbAverage::record`] with the caller's reading of the clock.
    pub fn record_at(&self, sample: Duration, now: std::time::Instant) {
        let now = tokio::time::Instant::from_std(now)
            .saturating_duration_since(clock_base())
            .as_micros() as u64
            + 1;
        let sample = sample.as_micros() as f64;
        let last = self.at.swap(now, Ordering::Relaxed);
        let old = f64::from_bits(self.micros.load(Ordering::Relaxed));
        let value = if last == 0 {
            sample
        } else {
            let age = now.saturating_sub(last) as f64;
            let keep = decay(age / DECAY.as_micros() as f64);
            old * keep + sample * (1.0 - keep)
        };
        self.micros.store(value.to_bits(), Ordering::Relaxed);
    }

    /// The average; `None` before any sample.
    pub fn get(&self) -> Option<Duration> {
        if self.at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let v = f64::from_bits(self.micros.load(Ordering::Relaxed));
        Some(Duration::from_micros(v.max(0.0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choices_prefer_the_faster_yet_still_probe_the_slower() {
        let cost = |i: usize| if i == 0 { 500.0 } else { 50.0 };
        let picks: Vec<usize> = (0..10_000).map(|_| two_choices(&[1, 1], cost)).collect();
        let slow = picks.iter().filter(|&&i| i == 0).count();
        // Only probes reach the slow one: about half of one in twenty.
        assert!(slow > 100 && slow < 600, "{slow}");
        // Weights still count: 9 to 1 with equal costs.
        let heavy = (0..10_000)
            .filter(|_| two_choices(&[9, 1], |_| 1.0) == 0)
            .count();
        assert!(heavy > 8000, "{heavy}");
    }

    #[test]
    fn the_decay_series_agrees_with_exp() {
        for x in [
            0.0f64, 1e-9, 1e-7, 3.3e-5, 1e-4, 5e-4, 9.99e-4, 1e-3, 0.5, 3.0,
        ] {
            let want = (-x).exp();
            assert!((decay(x) - want).abs() <= want * 4.0 * f64::EPSILON, "{x}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_average_follows_recent_samples() {
        let a = TtfbAverage::default();
        assert_eq!(a.get(), None);
        a.record(Duration::from_millis(1000));
        assert_eq!(a.get(), Some(Duration::from_millis(1000)));
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(5)).await;
            a.record(Duration::from_millis(10));
        }
        assert!(
            a.get().unwrap() < Duration::from_millis(20),
            "{:?}",
            a.get()
        );
    }

    #[test]
    fn smooth_wrr_shares_by_weight_and_interleaves() {
        // Clients 0 (weight 5), 1 (weight 1), 2 (weight 1) in one tier.
        let w = [5u32, 1, 1];
        let c = Candidates::new(&[0, 1, 2], |_| 1, |i| w[i]);
        let firsts: Vec<usize> = (0..7).map(|_| c.order()[0]).collect();
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(firsts.iter().filter(|&&i| i == 1).count(), 1);
        assert_eq!(firsts.iter().filter(|&&i| i == 2).count(), 1);
        // nginx's sequence for 5/1/1: a a b a c a a
        assert_eq!(firsts, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn tiers_keep_priority_and_list_every_member() {
        let p = [1i64, 1, 2];
        let c = Candidates::new(&[0, 1, 2], |i| p[i], |_| 1);
        for _ in 0..4 {
            let o = c.order();
            assert_eq!(o.len(), 3);
            assert_eq!(o[2], 2);
        }
    }
}
