//! The leases a subscriber holds, and which are due for renewal.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::super::metrics::QueueMetrics;
use crate::message::{Lease, MessageId};

/// Every message this subscriber holds a lease on, from fetch to outcome.
#[derive(Default)]
pub(super) struct Leases {
    held: HashMap<MessageId, Held>,
}

/// A lease this subscriber holds.
pub(super) struct Held {
    pub(super) lease: Lease,
    /// When it was taken or last renewed.
    renewed: Instant,
    /// The handles its outcome is counted on.
    pub(super) metrics: QueueMetrics,
}

impl Leases {
    /// Records a lease taken at `now`.
    pub(super) fn insert(&mut self, lease: Lease, now: Instant, metrics: QueueMetrics) {
        self.held.insert(
            lease.id,
            Held {
                lease,
                renewed: now,
                metrics,
            },
        );
    }

    /// Forgets a lease: its outcome was written, or it was lost or given back.
    pub(super) fn remove(&mut self, id: MessageId) -> Option<Held> {
        self.held.remove(&id)
    }

    /// The leases taken or renewed at least `every` before `now`.
    pub(super) fn due(&self, now: Instant, every: Duration) -> Vec<Lease> {
        let mut due: Vec<Lease> = self
            .held
            .values()
            .filter(|held| now.duration_since(held.renewed) >= every)
            .map(|held| held.lease)
            .collect();
        // Oldest first, so a renewal cut short by an error has renewed the most urgent.
        due.sort_by_key(|lease| self.held[&lease.id].renewed);
        due
    }

    /// Records a renewal at `now`; nothing if the lease was forgotten meanwhile.
    pub(super) fn renewed(&mut self, id: MessageId, now: Instant) {
        if let Some(held) = self.held.get_mut(&id) {
            held.renewed = now;
        }
    }

    /// How many leases are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::metrics::SubscriberMetrics;
    use super::*;

    fn lease(id: i64) -> Lease {
        Lease {
            id,
            token: uuid::Uuid::nil(),
        }
    }

    fn metrics() -> QueueMetrics {
        SubscriberMetrics::new(&["q".to_owned()], None)
            .queue("q")
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn only_leases_older_than_the_period_are_due_oldest_first() {
        let mut leases = Leases::default();
        let every = Duration::from_secs(10);
        let start = Instant::now();
        leases.insert(lease(1), start, metrics());
        leases.insert(lease(2), start + Duration::from_secs(5), metrics());
        assert!(leases.due(start + Duration::from_secs(9), every).is_empty());
        assert_eq!(
            leases.due(start + Duration::from_secs(10), every),
            vec![lease(1)]
        );
        assert_eq!(
            leases.due(start + Duration::from_secs(20), every),
            vec![lease(1), lease(2)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_restarts_the_period_and_a_removed_lease_is_never_due() {
        let mut leases = Leases::default();
        let every = Duration::from_secs(10);
        let start = Instant::now();
        leases.insert(lease(1), start, metrics());
        leases.insert(lease(2), start, metrics());
        let later = start + every;
        leases.renewed(1, later);
        assert_eq!(leases.due(later, every), vec![lease(2)]);
        assert!(leases.remove(2).is_some());
        assert!(leases.remove(2).is_none(), "removed once");
        leases.renewed(2, later); // forgotten meanwhile: ignored
        assert!(leases.due(later, every).is_empty());
        assert_eq!(leases.len(), 1);
    }
}
