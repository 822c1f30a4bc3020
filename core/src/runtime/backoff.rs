//! Growing waits with jitter: idle polling and error backoff share one shape.

use std::time::Duration;

/// A delay that doubles on every [`next`](Self::next) from `min` up to `max`, and returns to
/// `min` on [`reset`](Self::reset). Each delay is drawn in `[d / 2, d]` (jitter inside the
/// bound), so many subscribers that failed together do not retry together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay (jittered), doubling the base for the one after.
    pub(crate) fn next(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// [`next`](Self::next) with the random draw in `0.0..=1.0` given.
    pub(crate) fn next_with(&mut self, draw: f64) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        base.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
    }

    /// Back to `min`.
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let full: Vec<Duration> = (0..6).map(|_| b.next_with(1.0)).collect();
        assert_eq!(
            full,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        b.reset();
        assert_eq!(b.next_with(1.0), 100 * MS);
    }

    #[test]
    fn jitter_stays_between_half_and_the_full_delay() {
        let mut b = Backoff::new(100 * MS, 100 * MS);
        assert_eq!(b.next_with(0.0), 50 * MS);
        for _ in 0..1000 {
            let d = b.next();
            assert!(d >= 50 * MS && d <= 100 * MS, "{d:?}");
        }
    }
}
