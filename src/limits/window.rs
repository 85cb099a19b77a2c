//! A rolling 60-second window, in one-second buckets.
//!
//! Counts what happened in the last 60 whole seconds, as `rpm` and `tpm`
//! ask: a request started at second `s` leaves the window at `s + 60`.
//! Fixed size, no allocation: a caller's windows live inside its state.
//!
//! The sum is kept as buckets change ([`Window::sum`] is O(1) on the
//! request path): `total` is what the buckets of the 60 seconds ending at
//! `last` hold, and moving `last` forward subtracts the seconds that left.
//! A time before `last` (a clock stepped back) is answered by a scan.

/// Seconds the window spans.
pub const SPAN: u64 = 60;

#[derive(Debug, Clone)]
pub struct Window {
    /// The amount counted in each second; bucket `s % SPAN` holds second `s`
    /// when `seconds[s % SPAN] == s`.
    amounts: [u64; SPAN as usize],
    seconds: [u64; SPAN as usize],
    /// The newest second the window was brought to.
    last: u64,
    /// The buckets live at `last`, summed (wide enough never to saturate).
    total: u128,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            amounts: [0; SPAN as usize],
            // No second is `u64::MAX`: every bucket starts empty.
            seconds: [u64::MAX; SPAN as usize],
            last: 0,
            total: 0,
        }
    }
}

impl Window {
    fn live(&self, i: usize, now: u64) -> bool {
        let s = self.seconds[i];
        s != u64::MAX && s <= now && now - s < SPAN
    }

    /// Brings the window to `now` (a later second): the seconds that left
    /// it leave its total.
    fn advance(&mut self, now: u64) {
        if now <= self.last {
            return;
        }
        if now - self.last >= SPAN {
            self.total = 0;
        } else if now >= SPAN {
            // Live at `last` but not at `now`: seconds last-59 ..= now-60.
            for s in (self.last + 1).saturating_sub(SPAN)..=now - SPAN {
                let i = (s % SPAN) as usize;
                if self.seconds[i] == s {
                    self.total -= u128::from(self.amounts[i]);
                }
            }
        }
        self.last = now;
    }

    /// Sets bucket `i` to hold `amount` at second `s`, keeping the total.
    fn set(&mut self, i: usize, s: u64, amount: u64) {
        if self.live(i, self.last) {
            self.total -= u128::from(self.amounts[i]);
        }
        self.seconds[i] = s;
        self.amounts[i] = amount;
        if self.live(i, self.last) {
            self.total += u128::from(amount);
        }
    }

    /// The amount counted in the window that ends at `now` (a second).
    pub fn sum(&mut self, now: u64) -> u64 {
        if now >= self.last {
            self.advance(now);
            return u64::try_from(self.total).unwrap_or(u64::MAX);
        }
        (0..SPAN as usize)
            .filter(|&i| self.live(i, now))
            .fold(0u64, |acc, i| acc.saturating_add(self.amounts[i]))
    }

    /// The amount counted at second `s` exactly (0 once it has left).
    pub fn at(&self, s: u64) -> u64 {
        let i = (s % SPAN) as usize;
        if self.seconds[i] == s {
            self.amounts[i]
        } else {
            0
        }
    }

    /// Counts `n` at second `now`.
    pub fn add(&mut self, now: u64, n: u64) {
        self.advance(now);
        let i = (now % SPAN) as usize;
        let before = if self.seconds[i] == now {
            self.amounts[i]
        } else {
            0
        };
        self.set(i, now, before.saturating_add(n));
    }

    /// Changes what was counted at second `at` from `from` to `to`, if that
    /// second is still in the window; a second gone by stays as it was.
    pub fn adjust(&mut self, at: u64, from: u64, to: u64) {
        self.advance(at);
        let i = (at % SPAN) as usize;
        if self.seconds[i] == at {
            let v = self.amounts[i].saturating_sub(from).saturating_add(to);
            self.set(i, at, v);
        }
    }

    /// Seconds from `now` until the window holds at most `target`: the
    /// oldest seconds leave first. `None` when it already does.
    pub fn seconds_until_at_most(&mut self, now: u64, target: u64) -> Option<u64> {
        let mut total = self.sum(now);
        if total <= target {
            return None;
        }
        let mut live: [(u64, u64); SPAN as usize] = [(0, 0); SPAN as usize];
        let mut n = 0;
        for i in 0..SPAN as usize {
            if self.live(i, now) && self.amounts[i] > 0 {
                live[n] = (self.seconds[i], self.amounts[i]);
                n += 1;
            }
        }
        let live = &mut live[..n];
        live.sort_unstable_by_key(|&(s, _)| s);
        for &(s, amount) in live.iter() {
            total = total.saturating_sub(amount);
            if total <= target {
                return Some(s + SPAN - now);
            }
        }
        Some(SPAN)
    }

    /// Seconds until everything counted now has left the window (the
    /// newest second's exit); 0 when the window is empty.
    pub fn seconds_until_empty(&self, now: u64) -> u64 {
        // The common case, just after counting at `now`: the newest second
        // is `now` itself.
        let i = (now % SPAN) as usize;
        if self.seconds[i] == now && self.amounts[i] > 0 {
            return SPAN;
        }
        (0..SPAN as usize)
            .filter(|&i| self.live(i, now) && self.amounts[i] > 0)
            .map(|i| self.seconds[i] + SPAN - now)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_sixty_seconds() {
        let mut w = Window::default();
        w.add(1000, 5);
        w.add(1010, 3);
        assert_eq!(w.sum(1010), 8);
        assert_eq!(w.sum(1059), 8);
        assert_eq!(w.sum(1060), 3, "second 1000 left at 1060");
        assert_eq!(w.sum(1070), 0);
        // A bucket reused for a later second starts from zero.
        w.add(1120, 1);
        assert_eq!(w.sum(1120), 1);
    }

    #[test]
    fn says_when_room_comes_back() {
        let mut w = Window::default();
        w.add(100, 4);
        w.add(130, 6);
        assert_eq!(w.seconds_until_at_most(130, 10), None);
        assert_eq!(w.seconds_until_at_most(130, 9), Some(30));
        assert_eq!(w.seconds_until_at_most(130, 6), Some(30));
        assert_eq!(w.seconds_until_at_most(130, 5), Some(60));
        assert_eq!(w.seconds_until_at_most(130, 3), Some(60));
        assert_eq!(w.seconds_until_empty(130), 60);
    }

    /// The running total always equals the buckets summed, whatever the
    /// order of adds, adjustments and steps of time (back included).
    #[test]
    fn the_running_total_is_the_buckets_summed() {
        let mut w = Window::default();
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut now = 1_000u64;
        for _ in 0..20_000 {
            match next(10) {
                0..=4 => w.add(now, next(50)),
                5 => {
                    let at = now - next(90).min(now);
                    w.adjust(at, next(20), next(20));
                }
                6 => now += next(3),
                7 => now += next(100),
                8 => now -= next(5),
                _ => {}
            }
            let scan = (0..SPAN as usize)
                .filter(|&i| w.live(i, now))
                .fold(0u64, |acc, i| acc + w.amounts[i]);
            assert_eq!(w.sum(now), scan, "at {now}");
        }
    }

    #[test]
    fn adjusts_only_seconds_still_in_the_window() {
        let mut w = Window::default();
        w.add(10, 100);
        w.adjust(10, 100, 30);
        assert_eq!(w.sum(20), 30);
        w.add(80, 1);
        w.adjust(10, 30, 0);
        assert_eq!(w.sum(80), 1);
    }
}
