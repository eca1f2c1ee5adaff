//! Jittered exponential backoff, shared by [`Client::create`](crate::Client::create)'s resends
//! and the router's reconnects.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The delay before retry `failures` (0-based): `min · 2^failures` capped at `max`, jittered
/// to between half and all of it. Never more than `max` (nor `min` when `max < min`), never
/// less than half of the smaller of the two, whatever `failures` is.
pub(crate) fn jittered(min: Duration, max: Duration, failures: u32) -> Duration {
    let ceiling = min
        .saturating_mul(2u32.saturating_pow(failures.min(31)))
        .min(max);
    let half = ceiling / 2;
    half + half.mul_f64(random_unit())
}

/// A random number in `[0, 1)`, from the standard library's randomly keyed hasher.
pub(crate) fn random_unit() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_bounded_for_every_failure_count() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(30);
        let counts = (0..=70).chain([1_000, u32::MAX - 1, u32::MAX]);
        for failures in counts {
            for _ in 0..20 {
                let delay = jittered(min, max, failures);
                assert!(delay <= max, "{failures}: {delay:?} exceeds the cap");
                assert!(
                    delay >= min / 2,
                    "{failures}: {delay:?} is below half the minimum"
                );
            }
        }
        // Past the point where the doubling reaches the cap, the delay stays in [max/2, max].
        for failures in [9, 31, 32, u32::MAX] {
            let delay = jittered(min, max, failures);
            assert!(delay >= max / 2 && delay <= max, "{failures}: {delay:?}");
        }
    }

    #[test]
    fn a_cap_below_the_minimum_wins() {
        for failures in [0, 1, 5, u32::MAX] {
            let delay = jittered(Duration::from_secs(10), Duration::from_millis(50), failures);
            assert!(delay <= Duration::from_millis(50), "{delay:?}");
        }
        assert_eq!(jittered(Duration::ZERO, Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let draws: Vec<f64> = (0..200).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        let distinct: std::collections::HashSet<u64> =
            draws.iter().map(|draw| draw.to_bits()).collect();
        assert!(distinct.len() > 100, "{} distinct draws", distinct.len());
    }
}
