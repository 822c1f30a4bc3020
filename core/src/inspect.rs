//! What tests and operators see of stored messages: [`Inspect::messages`] and
//! [`Inspect::dead_letters`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, derefs_to_envelope};
use crate::error::Result;
use crate::store::Store;

/// Reads what a store holds: the live messages and the dead letters.
///
/// For tests, operators and the CLI; each call reads the whole table (or one queue of it).
#[async_trait]
pub trait Inspect: Store {
    /// The messages still stored (committed, not acked, not dead-lettered), of `queue` or of
    /// every queue, in id order, each with its [`MessageState`](crate::MessageState) by the
    /// backend's clock. For tests and operators; it reads the whole table.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn messages(&self, queue: Option<&str>) -> Result<Vec<StoredMessage>>;

    /// The dead-lettered messages, of `queue` or of every queue, in id order.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn dead_letters(&self, queue: Option<&str>) -> Result<Vec<DeadLetter>>;
}

/// Where a stored message stands, by the backend's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageState {
    /// Eligible for fetch now.
    Ready,
    /// Waiting for its `next_attempt_at` (a delay, or a retry's backoff).
    Scheduled,
    /// Leased by a consumer (possibly expired, then fetchable again).
    Leased,
}

/// A message still in the outbox table (published and committed, not acked or dead-lettered).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredMessage {
    /// The message: id, queue, payload, headers, correlation id, attempts, deliveries, last
    /// error. A `StoredMessage` dereferences to it.
    pub envelope: Envelope,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// When it becomes (or became) eligible.
    pub next_attempt_at: DateTime<Utc>,
    /// The subconsumer holding it, when leased by one.
    pub acquired_by: Option<String>,
    /// Where it stands now.
    pub state: MessageState,
}

derefs_to_envelope!(StoredMessage, DeadLetter);

impl StoredMessage {
    /// A stored message: `envelope` in `state`, published and eligible at the Unix epoch,
    /// held by no subconsumer. Set the other fields directly.
    ///
    /// For backends implementing [`Inspect`] and for tests.
    pub fn new(envelope: Envelope, state: MessageState) -> Self {
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        StoredMessage {
            envelope,
            created_at: epoch,
            next_attempt_at: epoch,
            acquired_by: None,
            state,
        }
    }
}

/// A message in the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message as it was when dead-lettered (its id is the one it had in the outbox
    /// table; `attempts` includes the final one). A `DeadLetter` dereferences to it.
    pub envelope: Envelope,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A dead letter: `envelope`, moved for `reason` at `dead_at`.
    ///
    /// For backends implementing [`Inspect`] and for tests.
    pub fn new(envelope: Envelope, reason: impl Into<String>, dead_at: DateTime<Utc>) -> Self {
        DeadLetter {
            envelope,
            reason: reason.into(),
            dead_at,
        }
    }
}
