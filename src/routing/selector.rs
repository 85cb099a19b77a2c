//! Candidate order for one request: priority tiers, smooth weighted round
//! robin inside a tier, the others of the tier as its failovers.

use std::sync::Mutex;

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
        let mut out = Order::new();
        for t in &self.tiers {
            t.order_into(&mut out);
        }
        out
    }

    /// Every candidate in priority then file order (no traffic sharing).
    pub fn in_priority_order(&self) -> impl Iterator<Item = usize> + '_ {
        self.tiers.iter().flat_map(|t| t.members.iter().copied())
    }
}

impl Tier {
    fn order_into(&self, out: &mut Order) {
        if self.members.len() == 1 {
            out.push(self.members[0]);
            return;
        }
        let first = self.pick();
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

#[cfg(test)]
mod tests {
    use super::*;

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
