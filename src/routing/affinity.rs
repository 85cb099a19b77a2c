//! Affinity: requests with the same value go to the same (client, key)
//! while it is healthy, so that the provider's prompt cache for that key hits.
//!
//! No table: weighted rendezvous hashing. Each candidate pair scores
//! `weight / -ln(u)`, `u` drawn from a hash of the value and the pair; the
//! highest score wins. Every instance with the same config computes the same
//! scores, and when a pair drops out (cooling, out of quota) only the values
//! whose winner it was move: every other value's winner still wins.
//!
//! A value is hashed once as it arrives and never kept; its length does not
//! matter beyond the hashing.

/// A value's hash: FNV-1a over its bytes, then a finalizer so that values
/// differing in one byte land far apart. Stable across builds and hosts,
/// because every instance must agree.
pub fn hash_value(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// A (client, key) pair's seed, from names every instance shares: the
/// client's name and the key's redacted id.
pub fn pair_seed(client: &str, key_id: &str) -> u64 {
    let mut bytes = Vec::with_capacity(client.len() + key_id.len() + 1);
    bytes.extend_from_slice(client.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key_id.as_bytes());
    hash_value(&bytes)
}

/// The pair's score for `value`; `weight` is its share of sessions.
pub fn score(value: u64, seed: u64, weight: f64) -> f64 {
    // 53 bits of the mixed hash as a number in (0, 1).
    let u = ((mix(value ^ seed.rotate_left(17)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn winner(value: u64, pairs: &[(u64, f64)]) -> usize {
        let mut best = 0;
        for (i, &(seed, w)) in pairs.iter().enumerate() {
            if score(value, seed, w) > score(value, pairs[best].0, pairs[best].1) {
                best = i;
            }
        }
        best
    }

    #[test]
    fn values_spread_by_weight_and_a_removed_pair_moves_only_its_own() {
        let pairs: Vec<(u64, f64)> = (0..10)
            .map(|i| (pair_seed("c", &format!("key-{i}")), 1.0))
            .collect();
        let values: Vec<u64> = (0..10_000u32)
            .map(|i| hash_value(format!("session-{i}").as_bytes()))
            .collect();
        let mut counts = [0usize; 10];
        let first: Vec<usize> = values.iter().map(|&v| winner(v, &pairs)).collect();
        for &w in &first {
            counts[w] += 1;
        }
        for c in counts {
            assert!((800..=1200).contains(&c), "{counts:?}");
        }
        // Pair 3 drops out: its values move, no other value does.
        let mut without = pairs.clone();
        without[3].1 = 0.0;
        for (&v, &was) in values.iter().zip(&first) {
            let now = winner(v, &without);
            if was != 3 {
                assert_eq!(now, was);
            } else {
                assert_ne!(now, 3);
            }
        }
        // Weight 3 against 1: about three quarters.
        let two = [(pairs[0].0, 3.0), (pairs[1].0, 1.0)];
        let heavy = values.iter().filter(|&&v| winner(v, &two) == 0).count();
        assert!((7000..=8000).contains(&heavy), "{heavy}");
    }

    #[test]
    fn hashing_is_stable_and_takes_any_length() {
        // Every instance must compute the same value: pinned here.
        assert_eq!(hash_value(b""), mix(0xcbf2_9ce4_8422_2325));
        let long = vec![b'x'; 10 * 1024];
        assert_eq!(hash_value(&long), hash_value(&long.clone()));
        assert_ne!(hash_value(b"a"), hash_value(b"b"));
    }
}
