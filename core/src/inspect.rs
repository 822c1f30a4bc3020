//! What tests and operators see of stored messages: [`Inspect::messages`] and
//! [`Inspect::dead_letters`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Result;
use crate::message::{Headers, MessageId};
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
    /// The id.
    pub id: MessageId,
    /// The queue.
    pub queue: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers, if any.
    pub headers: Option<Headers>,
    /// The correlation id.
    pub correlation_id: Uuid,
    /// Handler outcomes recorded (retries).
    pub attempts: i32,
    /// Times leased.
    pub deliveries: i32,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// When it is (or was) eligible.
    pub next_attempt_at: DateTime<Utc>,
    /// The error recorded by the last retry.
    pub last_error: Option<String>,
    /// The subconsumer holding it, if any.
    pub acquired_by: Option<String>,
    /// Its state now.
    pub state: MessageState,
}

impl StoredMessage {
    /// A stored message with the given fields and every other at a neutral value, for other
    /// backends (the fake) to fill in. Not part of the stable API.
    #[doc(hidden)]
    pub fn __new(id: MessageId, queue: String, payload: Vec<u8>, state: MessageState) -> Self {
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        StoredMessage {
            id,
            queue,
            payload,
            headers: None,
            correlation_id: Uuid::nil(),
            attempts: 0,
            deliveries: 0,
            created_at: epoch,
            next_attempt_at: epoch,
            last_error: None,
            acquired_by: None,
            state,
        }
    }

    /// Deserializes the payload from JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`](crate::Error::Json) if the payload is not valid JSON for `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// A message in the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id it had in the outbox table.
    pub id: MessageId,
    /// The queue.
    pub queue: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers, if any.
    pub headers: Option<Headers>,
    /// The correlation id.
    pub correlation_id: Uuid,
    /// Handler outcomes recorded, the final one included.
    pub attempts: i32,
    /// Times leased.
    pub deliveries: i32,
    /// The error recorded by the last retry.
    pub last_error: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A dead letter with the given fields and every other at a neutral value, for other
    /// backends (the fake) to fill in. Not part of the stable API.
    #[doc(hidden)]
    pub fn __new(
        id: MessageId,
        queue: String,
        payload: Vec<u8>,
        reason: String,
        dead_at: DateTime<Utc>,
    ) -> Self {
        DeadLetter {
            id,
            queue,
            payload,
            headers: None,
            correlation_id: Uuid::nil(),
            attempts: 0,
            deliveries: 0,
            last_error: None,
            reason,
            dead_at,
        }
    }
}
