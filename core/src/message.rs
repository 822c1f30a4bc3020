//! Messages to publish, deliveries handed to consumers, and the leases that fence outcomes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::cancel::Cancellation;
use crate::envelope::{Envelope, derefs_to_envelope};
pub use crate::envelope::{Headers, MessageId};
use crate::error::{Error, Result};

/// The longest queue name accepted, in bytes. The queue name travels as the NOTIFY payload,
/// which Postgres caps at 8000 bytes; 255 leaves room and keeps indexes small.
pub const MAX_QUEUE_LEN: usize = 255;

/// A message to publish: its queue, an opaque payload and optional headers, correlation id and
/// delay.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::Message;
///
/// let m = Message::json("emails", &serde_json::json!({"to": "ada@example.com"}))?
///     .header("tenant", "acme")
///     .delay(Duration::from_secs(30));
/// assert_eq!(m.get_queue(), "emails");
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Option<Headers>,
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) available: Availability,
    pub(crate) key: Option<String>,
}

/// When a published message becomes eligible for fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Availability {
    /// At once (at the database's `now()` of the publishing statement).
    #[default]
    Now,
    /// This long after the publishing statement's `now()`.
    After(Duration),
    /// Not before this instant.
    At(DateTime<Utc>),
}

impl Message {
    /// A message for `queue` with raw bytes as payload.
    ///
    /// The queue name is validated when the message is published.
    pub fn new(queue: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            queue: queue.into(),
            payload: payload.into(),
            headers: None,
            correlation_id: None,
            available: Availability::Now,
            key: None,
        }
    }

    /// A message for `queue` whose payload is `value` serialized as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `value` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(queue: impl Into<String>, value: &T) -> Result<Self> {
        Ok(Message::new(queue, serde_json::to_vec(value)?))
    }

    /// Adds one header. Headers are stored as a JSON object in the `headers` column.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.headers
            .get_or_insert_with(Headers::new)
            .insert(key.into(), value.into());
        self
    }

    /// Replaces all headers.
    #[must_use]
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sets the correlation id. When absent, publishing generates a random (v4) one; an explicit
    /// id always wins.
    #[must_use]
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// An idempotency key, for messages published to a topic
    /// ([`Topics::publish_to_topics`](crate::Topics::publish_to_topics)): while the key is
    /// remembered (see [`Rotation::key_retention`](crate::pg::Rotation::key_retention), 24 hours by
    /// default), publishing it again to the same topic writes nothing and returns the first
    /// message's id as [`Published::Duplicate`](crate::topic::Published::Duplicate). Once the
    /// retention has passed since that message was published, the key is free again and the
    /// next publish of it writes a new message. Queues refuse keyed messages.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The idempotency key, if any.
    pub fn get_idempotency_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Makes the message eligible only `delay` after it is published (database clock).
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.available = Availability::After(delay);
        self
    }

    /// Makes the message eligible only from `at` on.
    #[must_use]
    pub fn not_before(mut self, at: DateTime<Utc>) -> Self {
        self.available = Availability::At(at);
        self
    }

    /// The queue this message is routed to.
    pub fn get_queue(&self) -> &str {
        &self.queue
    }

    /// The payload bytes.
    pub fn get_payload(&self) -> &[u8] {
        &self.payload
    }

    /// The headers, if any were set.
    pub fn get_headers(&self) -> Option<&Headers> {
        self.headers.as_ref()
    }

    /// The explicit correlation id, if one was set.
    pub fn get_correlation_id(&self) -> Option<Uuid> {
        self.correlation_id
    }

    /// When the message becomes eligible.
    pub fn get_availability(&self) -> Availability {
        self.available
    }

    /// Checks what publishing stores: the queue name ([`validate_queue`]), no NUL character
    /// in any header key or string (Postgres' `jsonb` refuses them), a delay of at most
    /// [`MAX_DELAY`](crate::MAX_DELAY) and a `not_before` Postgres can store. Every backend
    /// runs it before writing anything.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`], or [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_queue(&self.queue)?;
        if let Some(key) = &self.key {
            if key.is_empty() || key.len() > MAX_QUEUE_LEN {
                return Err(Error::InvalidArgument(format!(
                    "idempotency key must be 1 to {MAX_QUEUE_LEN} bytes, got {}",
                    key.len()
                )));
            }
            crate::validate::text("idempotency key", key)?;
        }
        if let Some(headers) = &self.headers {
            crate::validate::json("headers", headers)?;
        }
        match self.available {
            Availability::Now => Ok(()),
            Availability::After(delay) => crate::validate::delay("publish delay", delay),
            Availability::At(at) => crate::validate::instant("not_before", at),
        }
    }
}

impl Message {
    /// Checks a message for a queue: as [`validate`](Self::validate), and no idempotency key
    /// (only topics remember keys).
    ///
    /// # Errors
    ///
    /// As [`validate`](Self::validate); [`Error::InvalidArgument`] for a keyed message.
    pub fn validate_for_queue(&self) -> Result<()> {
        self.validate()?;
        if self.key.is_some() {
            return Err(Error::InvalidArgument(format!(
                "message to queue {:?} has an idempotency key; keys are for topics (publish_to_topics)",
                self.queue
            )));
        }
        Ok(())
    }
}

/// Checks a queue name: not empty, at most [`MAX_QUEUE_LEN`] bytes, no NUL byte.
///
/// # Errors
///
/// [`Error::InvalidQueue`] naming the problem.
pub fn validate_queue(queue: &str) -> Result<()> {
    let reason = if queue.is_empty() {
        "it is empty"
    } else if queue.len() > MAX_QUEUE_LEN {
        "it is longer than 255 bytes"
    } else if queue.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(Error::InvalidQueue {
        queue: queue.chars().take(80).collect(),
        reason,
    })
}

/// The proof of holding a message: its id and the token of the batch that leased it.
///
/// Every outcome is fenced by both: once a lease has expired and another consumer has taken the
/// row, the old lease's outcomes change nothing and report `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The leased message.
    pub id: MessageId,
    /// The token of the fetch that leased it (one per fetched batch).
    pub token: Uuid,
}

/// One leased hand-out of a message to a consumer.
///
/// A message may be delivered more than once (at-least-once delivery): handlers must be
/// idempotent.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Delivery {
    /// The message: id, queue, payload, headers, correlation id, attempts, deliveries, last
    /// error. A `Delivery` dereferences to it, so `delivery.id` reads `delivery.envelope.id`.
    pub envelope: Envelope,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// When it became (or becomes) eligible.
    pub next_attempt_at: DateTime<Utc>,
    /// When it was first leased.
    pub first_attempt_at: DateTime<Utc>,
    /// When this lease was taken (database clock).
    pub acquired_at: DateTime<Utc>,
    /// The lease token of this delivery's batch.
    pub token: Uuid,
    /// The subconsumer holding it, when leased by one.
    pub acquired_by: Option<String>,
    /// The subscriber's shutdown signal, set when a subscriber starts the handler.
    pub(crate) cancel: Cancellation,
}

derefs_to_envelope!(Delivery);

impl Delivery {
    /// Resolves when the [`Subscriber`](crate::Subscriber) running this delivery's handler
    /// asks it to stop: at shutdown, [`SubscriberOptions::shutdown_grace`] before the
    /// [`shutdown_timeout`](crate::SubscriberOptions::shutdown_timeout) aborts the handler.
    /// Never resolves for a delivery that no subscriber is running (fetched by hand, say).
    ///
    /// A handler that may run long selects on it beside its work and ends early: with `Ok`
    /// if what it did so far completes the message, with an error (retried per the policy;
    /// [`HandlerError::retry_after`](crate::HandlerError::retry_after) with zero makes it
    /// ready at once) if not. Either way its outcome is recorded; a handler still running at
    /// the timeout is aborted instead, and its message is delivered again once its lease
    /// expires.
    ///
    /// ```
    /// use std::time::Duration;
    /// use postbox_core::{Delivery, HandlerError};
    ///
    /// async fn handle(delivery: Delivery) -> Result<(), HandlerError> {
    ///     tokio::select! {
    ///         () = export_report(&delivery) => Ok(()),
    ///         () = delivery.cancelled() => {
    ///             Err(HandlerError::retry_after(Duration::ZERO, "shutting down"))
    ///         }
    ///     }
    /// }
    /// # async fn export_report(_: &Delivery) {}
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future and calling again waits for the same signal.
    ///
    /// [`SubscriberOptions::shutdown_grace`]: crate::SubscriberOptions::shutdown_grace
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Whether the subscriber running this delivery's handler has asked it to stop (see
    /// [`cancelled`](Self::cancelled)).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// This delivery, carrying the signal of `token`.
    pub(crate) fn with_cancellation(mut self, token: &tokio_util::sync::CancellationToken) -> Self {
        self.cancel = Cancellation::of(token);
        self
    }

    /// The lease to pass to outcome calls.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            token: self.token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_validation() {
        assert!(validate_queue("orders").is_ok());
        assert!(validate_queue(&"q".repeat(MAX_QUEUE_LEN)).is_ok());
        for bad in [
            String::new(),
            "q".repeat(MAX_QUEUE_LEN + 1),
            "a\0b".to_owned(),
        ] {
            let err = validate_queue(&bad).expect_err("rejected");
            assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
        }
    }

    #[test]
    fn builder_sets_fields() {
        let id = Uuid::new_v4();
        let m = Message::new("q", b"x".to_vec())
            .header("a", 1)
            .header("b", "two")
            .correlation_id(id)
            .delay(Duration::from_secs(3));
        assert_eq!(m.get_headers().map(|h| h.len()), Some(2));
        assert_eq!(m.get_correlation_id(), Some(id));
        assert_eq!(
            m.get_availability(),
            Availability::After(Duration::from_secs(3))
        );
    }
}
