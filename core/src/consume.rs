//! [`Consume`]: fetch and fenced outcomes, the capability the subscriber runtime drives, and
//! their parameter types.

use std::time::Duration;

use async_trait::async_trait;

use crate::engine::Engine;
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::message::{Delivery, Lease, MessageId};
use crate::outcome::Outcome;
use crate::retry::{HandlerError, RetryDecision, RetryPolicy};
use crate::store::Store;

/// Leases messages with fetch and settles them with fenced outcomes.
///
/// # Delivery contract
///
/// - **At least once.** A fetched message is leased, not removed; if its holder neither acks nor
///   retries it within `lease_ttl`, a later fetch leases it again under a new token. Handlers
///   must be idempotent.
/// - **Fenced outcomes.** [`ack`](Self::ack), [`retry`](Self::retry),
///   [`dead_letter`](Self::dead_letter), [`renew_lease`](Self::renew_lease) and
///   [`release`](Self::release) match on message id **and** lease token. `Ok(false)` means the
///   lease was lost (expired and re-leased, or already settled) and nothing changed.
/// - **Nothing is deleted** unless it was acked; rejected and exhausted messages move to the
///   dead-letter table.
/// - **Order.** Among eligible messages, fetch hands out `(next_attempt_at, id)` order.
#[async_trait]
pub trait Consume: Store {
    /// The backend's [`Engine`], if it has one: server-side sessions the runtime keeps.
    ///
    /// `Some` lets the subscriber runtime hold a persistent fetch connection and a LISTEN
    /// connection; `None` (the fake) makes it poll and open no connection at all.
    fn engine(&self) -> Option<&dyn Engine>;

    /// Leases up to `params.limit` eligible messages of the given queues under one fresh token.
    ///
    /// Eligible: not leased and `next_attempt_at <= now`, or leased longer ago than
    /// `params.lease_ttl`. A message already leased `max_deliveries` times is moved to the
    /// dead-letter table instead of being handed out again; that fetch then returns fewer
    /// messages (it does not pick a replacement), the next one serves the rest.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for no queues or a zero limit, [`Error::InvalidQueue`](crate::Error::InvalidQueue),
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a fetch dropped after the statement ran leaves its rows leased until
    /// `lease_ttl` passes; they are then fetched again. Nothing is lost.
    async fn fetch(&self, params: &FetchParams) -> Result<Vec<Delivery>>;

    /// Acks (deletes) a delivered message. `Ok(false)`: the lease was lost and nothing changed.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn ack(&self, lease: Lease) -> Result<bool>;

    /// Acks many deliveries in one statement and returns the ids whose ack took effect; a lost
    /// lease is left out.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row. A batch is one statement: all of its acks or none.
    async fn ack_batch(&self, leases: &[Lease]) -> Result<Vec<MessageId>>;

    /// Schedules a delivered message for another attempt: `attempts + 1`,
    /// `next_attempt_at = now + delay` (database clock), lease cleared, error recorded.
    /// `Ok(false)`: the lease was lost and nothing changed.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn retry(&self, lease: Lease, params: RetryParams) -> Result<bool>;

    /// Moves a delivered message to the dead-letter table with `reason`, in one statement.
    /// `Ok(false)`: the lease was lost and nothing changed.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn dead_letter(&self, lease: Lease, reason: &str) -> Result<bool>;

    /// Extends a lease: its clock restarts at `now`. For handlers that run longer than a
    /// fraction of `lease_ttl`. `Ok(false)`: the lease was lost.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the lease may or may not have been renewed (one statement); renewing again is
    /// harmless.
    async fn renew_lease(&self, lease: Lease) -> Result<bool>;

    /// Gives a leased message back unhandled (for example at shutdown, before its handler
    /// started): the lease is cleared, the delivery is not counted, attempts are unchanged.
    /// `Ok(false)`: the lease was lost.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn release(&self, lease: Lease) -> Result<bool>;

    /// Settles a failed delivery through `policy`: retry after the policy's delay, or
    /// dead-letter when the error is a rejection or retries are exhausted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn fail(
        &self,
        delivery: &Delivery,
        error: &HandlerError,
        policy: &RetryPolicy,
    ) -> Result<Outcome> {
        Ok(match failure_verdict(delivery, error, policy) {
            FailureVerdict::Retry { params, delay } => {
                if self.retry(delivery.lease(), params).await? {
                    Outcome::Retried { delay }
                } else {
                    Outcome::LeaseLost
                }
            }
            FailureVerdict::DeadLetter { reason } => {
                if self.dead_letter(delivery.lease(), &reason).await? {
                    Outcome::DeadLettered { reason }
                } else {
                    Outcome::LeaseLost
                }
            }
        })
    }
}

/// What a failed delivery becomes under a retry policy, ready to store: the decision of
/// [`RetryPolicy::decide`] with its texts made storable. Shared by [`Consume::fail`] and
/// [`Topics::fail_received`](crate::Topics::fail_received), which only differ in how they
/// apply it.
pub(crate) enum FailureVerdict {
    /// Retry with `params`; `delay` is the policy's, reported in the outcome.
    Retry {
        params: RetryParams,
        delay: Duration,
    },
    /// Dead-letter with `reason`.
    DeadLetter { reason: String },
}

/// Decides what `delivery`, failed with `error`, becomes under `policy`.
pub(crate) fn failure_verdict(
    delivery: &Delivery,
    error: &HandlerError,
    policy: &RetryPolicy,
) -> FailureVerdict {
    let elapsed = (delivery.acquired_at - delivery.first_attempt_at)
        .to_std()
        .unwrap_or_default();
    match policy.decide(delivery.attempts, elapsed, error) {
        // A handler's message is stored as given, but for NUL characters (which Postgres
        // cannot store) and a policy delay beyond what it can add.
        RetryDecision::Retry { delay } => FailureVerdict::Retry {
            params: RetryParams::new(delay.min(crate::MAX_DELAY))
                .error(crate::validate::storable(error.message())),
            delay,
        },
        RetryDecision::DeadLetter { reason } => FailureVerdict::DeadLetter {
            reason: crate::validate::storable(&reason).into_owned(),
        },
    }
}

/// Parameters of [`Consume::retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryParams {
    delay: Duration,
    error: Option<String>,
}

impl RetryParams {
    /// Retry after `delay` (database clock).
    pub fn new(delay: Duration) -> Self {
        RetryParams { delay, error: None }
    }

    /// Records `error` in the message's `last_error`. Defaults to none.
    #[must_use]
    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    /// The delay.
    pub fn get_delay(&self) -> Duration {
        self.delay
    }

    /// The error to record.
    pub fn get_error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Checks what a retry stores: a delay of at most [`MAX_DELAY`](crate::MAX_DELAY) and an
    /// error text without NUL characters. Every backend runs it before changing the row.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the field.
    pub fn validate(&self) -> Result<()> {
        crate::validate::delay("retry delay", self.delay)?;
        if let Some(error) = &self.error {
            crate::validate::text("retry error", error)?;
        }
        Ok(())
    }
}

/// Checks a dead-letter reason (no NUL characters); every backend runs it before moving the
/// row.
///
/// # Errors
///
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument).
pub fn validate_reason(reason: &str) -> Result<()> {
    crate::validate::text("dead-letter reason", reason)
}
