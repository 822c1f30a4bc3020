//! Outcomes waiting to be written: acks (batched) and failures.

use std::time::Duration;

use tokio::time::Instant;

use crate::message::{Delivery, Lease};
use crate::retry::HandlerError;

/// Acks are written at once, or batched: up to `ack_delay` after the oldest, or when this
/// many are waiting, whichever comes first.
pub(super) const ACK_BATCH: usize = 64;

/// The outcomes handlers reported that are not written yet. Kept until written: on a
/// database error they stay here and the next turn retries them.
pub(super) struct PendingOutcomes {
    ack_delay: Duration,
    acks: Vec<Lease>,
    /// When the oldest pending ack was queued (for `ack_delay`).
    acks_since: Option<Instant>,
    failures: Vec<(Delivery, HandlerError)>,
}

impl PendingOutcomes {
    pub(super) fn new(ack_delay: Duration) -> Self {
        PendingOutcomes {
            ack_delay,
            acks: Vec::new(),
            acks_since: None,
            failures: Vec::new(),
        }
    }

    /// Queues an ack.
    pub(super) fn ack(&mut self, lease: Lease) {
        self.acks_since.get_or_insert_with(Instant::now);
        self.acks.push(lease);
    }

    /// Queues a failure, to settle through the retry policy.
    pub(super) fn fail(&mut self, delivery: Delivery, error: HandlerError) {
        self.failures.push((delivery, error));
    }

    /// Whether the pending acks should be written now: there are some, and the delay is
    /// zero, or has passed, or [`ACK_BATCH`] are waiting, or `force` (shutdown).
    pub(super) fn acks_due(&self, force: bool) -> bool {
        !self.acks.is_empty()
            && (force
                || self.ack_delay.is_zero()
                || self.acks.len() >= ACK_BATCH
                || self
                    .acks_since
                    .is_some_and(|t| t.elapsed() >= self.ack_delay))
    }

    /// When the pending acks become due by time, if they wait for `ack_delay`.
    pub(super) fn acks_deadline(&self) -> Option<Instant> {
        if self.acks.is_empty() || self.ack_delay.is_zero() {
            return None;
        }
        self.acks_since.map(|t| t + self.ack_delay)
    }

    /// Takes the pending acks to write them.
    pub(super) fn take_acks(&mut self) -> Vec<Lease> {
        self.acks_since = None;
        std::mem::take(&mut self.acks)
    }

    /// Puts back acks that could not be written; they are due again after `ack_delay`.
    pub(super) fn unwritten_acks(&mut self, leases: Vec<Lease>) {
        self.acks = leases;
        self.acks_since = Some(Instant::now());
    }

    /// The next failure to settle.
    pub(super) fn next_failure(&mut self) -> Option<(Delivery, HandlerError)> {
        self.failures.pop()
    }

    /// Puts back a failure that could not be settled.
    pub(super) fn unsettled_failure(&mut self, delivery: Delivery, error: HandlerError) {
        self.failures.push((delivery, error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: i64) -> Lease {
        Lease {
            id,
            token: uuid::Uuid::nil(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_every_ack_is_due_at_once() {
        let mut pending = PendingOutcomes::new(Duration::ZERO);
        assert!(!pending.acks_due(true), "nothing to write");
        pending.ack(lease(1));
        assert!(pending.acks_due(false));
        assert_eq!(pending.acks_deadline(), None);
        assert_eq!(pending.take_acks(), vec![lease(1)]);
        assert!(!pending.acks_due(true));
    }

    #[tokio::test(start_paused = true)]
    async fn acks_wait_for_the_delay_the_batch_size_or_shutdown() {
        let delay = Duration::from_millis(50);
        let mut pending = PendingOutcomes::new(delay);
        let start = Instant::now();
        pending.ack(lease(1));
        assert!(!pending.acks_due(false));
        assert!(pending.acks_due(true), "shutdown writes them at once");
        assert_eq!(pending.acks_deadline(), Some(start + delay));
        tokio::time::advance(Duration::from_millis(20)).await;
        pending.ack(lease(2));
        assert_eq!(
            pending.acks_deadline(),
            Some(start + delay),
            "the oldest ack sets the deadline"
        );
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(pending.acks_due(false), "the delay passed");

        let mut pending = PendingOutcomes::new(Duration::from_secs(3600));
        for id in 0..ACK_BATCH as i64 {
            assert!(!pending.acks_due(false), "{id} waiting");
            pending.ack(lease(id));
        }
        assert!(pending.acks_due(false), "a full batch");
    }

    #[tokio::test(start_paused = true)]
    async fn unwritten_acks_are_kept_and_due_again_after_the_delay() {
        let delay = Duration::from_millis(50);
        let mut pending = PendingOutcomes::new(delay);
        pending.ack(lease(1));
        tokio::time::advance(delay).await;
        let taken = pending.take_acks();
        pending.unwritten_acks(taken);
        assert!(
            !pending.acks_due(false),
            "retried after the delay, not in a loop"
        );
        tokio::time::advance(delay).await;
        assert!(pending.acks_due(false));
        assert_eq!(pending.take_acks(), vec![lease(1)]);
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn failures_are_kept_until_settled() {
        let mut pending = PendingOutcomes::new(Duration::ZERO);
        let delivery = crate::Delivery::builder("q", "x").id(7).build();
        pending.fail(delivery, HandlerError::retry("boom"));
        let (delivery, error) = pending.next_failure().expect("one failure");
        pending.unsettled_failure(delivery, error);
        let (delivery, error) = pending.next_failure().expect("kept");
        assert_eq!(delivery.id, 7);
        assert_eq!(error.message(), "boom");
        assert!(pending.next_failure().is_none());
    }
}
