//! What became of a handled message.

use std::time::Duration;

/// What became of a handled message: in the subscriber's
/// [`SubscriberEvent::Handled`](crate::runtime::SubscriberEvent::Handled), from
/// [`Consume::fail`](crate::Consume::fail) (never `Acked` there) and from the testkit's
/// `run_one`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Acked (deleted).
    Acked,
    /// Scheduled for another attempt.
    Retried {
        /// After this delay.
        delay: Duration,
    },
    /// Moved to the dead-letter table.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// The lease was lost before the outcome was written: nothing changed, and the message
    /// is (or will be) delivered again.
    LeaseLost,
}
