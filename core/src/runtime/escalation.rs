//! Growing waits with jitter: idle polling and error backoff climb one
//! [`Backoff`](crate::Backoff) shape, the retry policy's exponential one.

use std::time::Duration;

use crate::retry::Backoff;

/// Where the runtime is on a doubling [`Backoff`] from `min` up to `max`: each
/// [`next`](Self::next) takes one step up, [`reset`](Self::reset) goes back to the first.
/// Each delay is drawn in `[d / 2, d]` (jitter inside the bound), so many subscribers that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub(crate) struct Escalation {
    shape: Backoff,
    /// The step the next delay is taken at (1-based, as `Backoff::base_delay`).
    step: u32,
}

impl Escalation {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Escalation {
            shape: Backoff::Exponential {
                initial: min,
                multiplier: 2.0,
                cap: max,
            },
            step: 1,
        }
    }

    /// The next delay (jittered), one step up for the one after.
    pub(crate) fn next(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// [`next`](Self::next) with the random draw in `0.0..=1.0` given.
    pub(crate) fn next_with(&mut self, draw: f64) -> Duration {
        let base = self.shape.base_delay(self.step);
        self.step = self.step.saturating_add(1);
        base.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
    }

    /// Back to the first step.
    pub(crate) fn reset(&mut self) {
        self.step = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Escalation::new(100 * MS, 1000 * MS);
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
        let mut b = Escalation::new(100 * MS, 100 * MS);
        assert_eq!(b.next_with(0.0), 50 * MS);
        for _ in 0..1000 {
            let d = b.next();
            assert!(d >= 50 * MS && d <= 100 * MS, "{d:?}");
        }
    }
}
