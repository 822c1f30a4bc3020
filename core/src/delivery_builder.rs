//! Building a [`Delivery`] by hand: to unit-test a handler with no backend at all, and for
//! backends other than Postgres (the fake) to hand out their own.
//!
//! **Feature:** `test-util` (on with postbox's `testkit` or `fake` features).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cancel::Cancellation;
use crate::envelope::Envelope;
use crate::error::Result;
use crate::message::{Delivery, Headers, MessageId};

impl Delivery {
    /// A builder for a delivery of `payload` on `queue`, as a handler would receive it the
    /// first time: id 1, no headers, a random correlation id and lease token, published and
    /// leased now, zero failed attempts, first delivery.
    ///
    /// ```
    /// use postbox_core::{Delivery, HandlerError};
    ///
    /// async fn handle(delivery: Delivery) -> Result<(), HandlerError> {
    ///     let order: u64 = delivery.json().map_err(HandlerError::reject)?;
    ///     if delivery.attempts >= 3 {
    ///         return Err(HandlerError::reject(format!("order {order}: giving up")));
    ///     }
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> postbox_core::Result<()> {
    /// let third_retry = Delivery::builder("orders", "42").attempts(3).deliveries(4).build();
    /// assert!(handle(third_retry).await.is_err());
    /// let bad = Delivery::builder("orders", "not json").build();
    /// assert!(handle(bad).await.is_err());
    /// let order = Delivery::builder_json("orders", &42)?.build();
    /// assert!(handle(order).await.is_ok());
    /// # Ok(()) }
    /// ```
    ///
    /// **Feature:** `test-util`.
    pub fn builder(queue: impl Into<String>, payload: impl Into<Vec<u8>>) -> DeliveryBuilder {
        let now = Utc::now();
        DeliveryBuilder {
            delivery: Delivery {
                envelope: Envelope {
                    correlation_id: Uuid::new_v4(),
                    deliveries: 1,
                    ..Envelope::new(1, queue, payload)
                },
                created_at: now,
                next_attempt_at: now,
                first_attempt_at: now,
                acquired_at: now,
                token: Uuid::new_v4(),
                acquired_by: None,
                cancel: Cancellation::default(),
            },
        }
    }

    /// [`builder`](Self::builder) with `value` serialized as the JSON payload.
    ///
    /// # Errors
    ///
    /// [`Error::Json`](crate::Error::Json) if `value` cannot be serialized.
    ///
    /// **Feature:** `test-util`.
    pub fn builder_json<T: Serialize + ?Sized>(
        queue: impl Into<String>,
        value: &T,
    ) -> Result<DeliveryBuilder> {
        Ok(Delivery::builder(queue, serde_json::to_vec(value)?))
    }
}

/// Sets a [`Delivery`]'s fields one by one; from [`Delivery::builder`].
///
/// **Feature:** `test-util`.
#[derive(Debug, Clone)]
#[must_use]
pub struct DeliveryBuilder {
    delivery: Delivery,
}

impl DeliveryBuilder {
    /// The message id.
    pub fn id(mut self, id: MessageId) -> Self {
        self.delivery.id = id;
        self
    }

    /// Adds one header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.delivery
            .headers
            .get_or_insert_with(Headers::new)
            .insert(key.into(), value.into());
        self
    }

    /// All headers at once (`None`: no headers column).
    pub fn headers(mut self, headers: Option<Headers>) -> Self {
        self.delivery.headers = headers;
        self
    }

    /// The correlation id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.delivery.correlation_id = id;
        self
    }

    /// Failed handler attempts recorded before this delivery.
    pub fn attempts(mut self, attempts: i32) -> Self {
        self.delivery.attempts = attempts;
        self
    }

    /// Times the message has been leased, this delivery included.
    pub fn deliveries(mut self, deliveries: i32) -> Self {
        self.delivery.deliveries = deliveries;
        self
    }

    /// When the message was published.
    pub fn created_at(mut self, at: DateTime<Utc>) -> Self {
        self.delivery.created_at = at;
        self
    }

    /// When the message became eligible.
    pub fn next_attempt_at(mut self, at: DateTime<Utc>) -> Self {
        self.delivery.next_attempt_at = at;
        self
    }

    /// When the message was first leased.
    pub fn first_attempt_at(mut self, at: DateTime<Utc>) -> Self {
        self.delivery.first_attempt_at = at;
        self
    }

    /// When this lease was taken.
    pub fn acquired_at(mut self, at: DateTime<Utc>) -> Self {
        self.delivery.acquired_at = at;
        self
    }

    /// The lease token.
    pub fn token(mut self, token: Uuid) -> Self {
        self.delivery.token = token;
        self
    }

    /// The subconsumer holding the lease.
    pub fn acquired_by(mut self, holder: Option<String>) -> Self {
        self.delivery.acquired_by = holder;
        self
    }

    /// The error the last retry recorded.
    pub fn last_error(mut self, error: Option<String>) -> Self {
        self.delivery.last_error = error;
        self
    }

    /// Ties [`Delivery::cancelled`] to `token`, to test how a handler answers a shutdown.
    ///
    /// ```
    /// use tokio_util::sync::CancellationToken;
    /// use postbox_core::Delivery;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let shutdown = CancellationToken::new();
    /// let delivery = Delivery::builder("reports", "q3").cancelled_by(&shutdown).build();
    /// assert!(!delivery.is_cancelled());
    /// shutdown.cancel();
    /// delivery.cancelled().await; // resolves: the handler would stop here
    /// assert!(delivery.is_cancelled());
    /// # }
    /// ```
    pub fn cancelled_by(mut self, token: &CancellationToken) -> Self {
        self.delivery.cancel = Cancellation::of(token);
        self
    }

    /// The delivery.
    pub fn build(self) -> Delivery {
        self.delivery
    }
}
