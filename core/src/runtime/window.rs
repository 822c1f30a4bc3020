//! The prefetch window: how many fetched messages may wait for a worker, grown while the
//! handlers outrun the fetches and shrunk back when they do not.
//!
//! Draining a deep queue with fast handlers is bound by the fetch round trip, and a fetch's
//! cost per row falls with its size (one statement, one lease token, one plan). A fixed small
//! prefetch keeps that subscriber fetching 32 rows at a time; a fixed large one parks hundreds
//! of leased messages in one subscriber's buffer while slow handlers work through them and
//! its competitors sit idle. The window takes the large batches only while they are useful:
//!
//! - it **doubles** (up to the ceiling) after a full fetch at whose return the handlers had
//!   used up the buffer and a worker was idle: the handlers ran out of work during the round
//!   trip, so the fetch was the bottleneck;
//! - it **halves** (down to the floor) after a full fetch that returned with messages still
//!   waiting or every worker busy: the handlers are the bottleneck, and more buffer only
//!   holds leases longer;
//! - it **returns to the floor** after a partial fetch: the queue is drained, and the next
//!   messages arrive a few at a time.

/// The current prefetch size between a floor ([`SubscriberOptions::prefetch`]) and a ceiling
/// ([`SubscriberOptions::max_prefetch`]).
///
/// [`SubscriberOptions::prefetch`]: crate::SubscriberOptions::prefetch
/// [`SubscriberOptions::max_prefetch`]: crate::SubscriberOptions::max_prefetch
#[derive(Debug, Clone)]
pub(crate) struct PrefetchWindow {
    floor: usize,
    ceiling: usize,
    current: usize,
}

impl PrefetchWindow {
    /// A window starting at `floor`; a ceiling below the floor is the floor.
    pub(crate) fn new(floor: usize, ceiling: usize) -> Self {
        PrefetchWindow {
            floor,
            ceiling: ceiling.max(floor),
            current: floor,
        }
    }

    /// How many fetched messages may wait for a worker now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Adjusts the window after a fetch that asked for `asked` rows and got `got`, given
    /// whether the workers were `starved` when it returned (nothing waiting, a worker idle).
    pub(crate) fn after_fetch(&mut self, asked: usize, got: usize, starved: bool) {
        self.current = if got < asked {
            self.floor
        } else if starved {
            self.current.saturating_mul(2).max(1).min(self.ceiling)
        } else {
            (self.current / 2).max(self.floor)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_fetches_for_idle_workers_double_the_window_up_to_the_ceiling() {
        let mut w = PrefetchWindow::new(16, 100);
        let mut seen = vec![w.current()];
        for _ in 0..5 {
            w.after_fetch(10, 10, true);
            seen.push(w.current());
        }
        assert_eq!(seen, [16, 32, 64, 100, 100, 100]);
    }

    #[test]
    fn full_fetches_for_busy_workers_halve_it_down_to_the_floor() {
        let mut w = PrefetchWindow::new(16, 512);
        for _ in 0..5 {
            w.after_fetch(1, 1, true);
        }
        assert_eq!(w.current(), 512);
        w.after_fetch(1, 1, false);
        assert_eq!(w.current(), 256);
        for _ in 0..10 {
            w.after_fetch(1, 1, false);
        }
        assert_eq!(w.current(), 16);
    }

    #[test]
    fn a_partial_fetch_returns_to_the_floor() {
        let mut w = PrefetchWindow::new(4, 512);
        for _ in 0..4 {
            w.after_fetch(1, 1, true);
        }
        assert_eq!(w.current(), 64);
        w.after_fetch(80, 79, true);
        assert_eq!(w.current(), 4);
    }

    #[test]
    fn a_ceiling_below_the_floor_pins_the_window() {
        let mut w = PrefetchWindow::new(16, 8);
        w.after_fetch(1, 1, true);
        assert_eq!(w.current(), 16);
    }

    #[test]
    fn a_zero_floor_can_still_grow() {
        let mut w = PrefetchWindow::new(0, 8);
        w.after_fetch(1, 1, true);
        assert_eq!(w.current(), 1);
        w.after_fetch(2, 2, true);
        assert_eq!(w.current(), 2);
    }
}
