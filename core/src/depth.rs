//! Queue depth: how many messages each queue holds in each state, and how long the oldest
//! ready one has waited, without reading the messages.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::store::Store;

/// One queue's messages by state, as [`Depth::queue_depths`] counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// Committed, not leased, due now.
    pub ready: i64,
    /// Committed, not leased, due later (delayed publishes, retries waiting for their delay).
    pub scheduled: i64,
    /// Leased to a consumer, without an outcome yet (expired leases included, until a fetch
    /// takes them back).
    pub leased: i64,
    /// In the dead-letter table.
    pub dead: i64,
    /// How long the oldest ready message has been due (its publish, or the end of its retry
    /// delay, until now): the queue's lag. `None` when nothing is ready.
    pub oldest_ready: Option<Duration>,
}

impl QueueDepth {
    /// The depth of an empty `queue`: every count zero, no lag. Set the fields as they are
    /// counted.
    ///
    /// For backends implementing [`Depth`] and for tests.
    pub fn new(queue: impl Into<String>) -> Self {
        let queue = queue.into();
        QueueDepth {
            queue,
            ready: 0,
            scheduled: 0,
            leased: 0,
            dead: 0,
            oldest_ready: None,
        }
    }
}

/// Counting each queue's messages by state: for dashboards, alerts and the ops CLI.
///
/// Unlike [`Inspect::messages`](crate::Inspect::messages), which reads every message with its payload, this counts:
/// on Postgres from the partial indexes (`T_pending_idx`, `T_lease_idx`, `T_dead_idx`) in one
/// function call planned without sequential scans, so its cost is a walk of index entries,
/// not of the table. A role needs `SELECT` on the outbox and its dead letters
/// ([`Access::Inspector`](crate::pg::Access::Inspector) has it).
#[async_trait]
pub trait Depth: Store {
    /// The depth of `queue`, or of every queue holding a message in any state, ordered by
    /// queue name; a queue with nothing in it is not listed. States are judged by the
    /// backend's clock.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`](crate::Error::InvalidQueue) for a bad queue name;
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn queue_depths(&self, queue: Option<&str>) -> Result<Vec<QueueDepth>>;
}
