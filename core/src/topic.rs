//! Topics and subscriptions: a message published once to a topic is received by every
//! subscription of that topic, each with its own progress, leases, retries and dead letters.
//!
//! A queue ([`Consume::fetch`](crate::Consume::fetch)) hands each message to one consumer; a topic hands each
//! message to every subscription, and within one subscription to one of its receivers, which
//! may be many cooperating processes. Queues stay as they are: a queue is the right tool when
//! every message has exactly one consumer; a topic when several services each need all of
//! them.
//!
//! # Storage and cost (Postgres)
//!
//! A published message is one row of the topic log `T_log`, whatever the number of
//! subscriptions. A subscription is a cursor over the log (a pair of snapshots and a position
//! between them) plus the batches it has handed out; receiving appends one batch row, which
//! also records the cursor after it, and acking a whole batch marks that row done. Only
//! exceptions are written per message: a retry, a release, a dead letter, a partial ack, or a
//! batch whose lease expired (its unsettled messages are then taken back one by one). Neither
//! the log nor the batches are deleted from row by row: space comes back when rotation
//! truncates a generation every subscription has passed and settled, so a long transaction
//! holding the database's xmin horizon does not make receives slower (see
//! `docs/design/storage.md`).
//!
//! # What a subscription receives
//!
//! Every message whose publishing transaction was not yet committed when the subscription
//! was created: a transaction in flight while `subscribe` runs is delivered once it commits;
//! one that committed before is not. Unsubscribing drops what was still pending for that
//! subscription only, and a transaction in flight while it is dropped publishes to the
//! remaining subscriptions (and to none if it was the last). A message rolled back is
//! received by no one.
//!
//! # Order
//!
//! The messages of one transaction arrive in publish order. Across transactions, messages
//! arrive roughly in commit order: a message whose transaction committed before a receive
//! started is never overtaken by one committed after it. Retried and released messages come
//! back when due, ahead of newer messages.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::consume::{FailureVerdict, RetryParams, failure_verdict};
use crate::error::{Error, Result};
use crate::fetch::DEFAULT_LEASE_TTL;
use crate::inspect::DeadLetter;
use crate::message::{Delivery, Lease, Message, MessageId, validate_queue};
use crate::outcome::Outcome;
use crate::publish::Publish;
use crate::retry::{HandlerError, RetryPolicy};

/// What [`Topics::subscribe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// The subscription was created now: it receives messages committed from now on.
    New,
    /// It existed already (for the same topic); its cursor is unchanged.
    Existing,
}

/// What publishing one message to a topic did ([`Topics::publish_to_topics`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Published {
    /// Written, with this id.
    New(MessageId),
    /// Not written: its idempotency key is remembered for the topic, from the message with
    /// this id (published earlier, or earlier in the same call).
    Duplicate(MessageId),
}

impl Published {
    /// The message's id: the new one, or the one the key belongs to.
    pub fn id(self) -> MessageId {
        match self {
            Published::New(id) | Published::Duplicate(id) => id,
        }
    }

    /// Whether the message was written now.
    pub fn is_new(self) -> bool {
        matches!(self, Published::New(_))
    }
}

/// What [`Topics::unsubscribe`] does with messages the subscription has not processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribe {
    /// Drops them with the subscription (other subscriptions keep their copies).
    Discard,
    /// Refuses with [`Error::SubscriptionNotDrained`] while any is unprocessed (received
    /// or not, but neither acked nor dead-lettered).
    IfDrained,
}

/// One subscription, as [`Topics::subscriptions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionInfo {
    /// The subscription's name.
    pub name: String,
    /// The topic it subscribes.
    pub topic: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Messages neither acked nor dead-lettered: not yet received, received and unsettled,
    /// or waiting for a retry.
    pub backlog: i64,
    /// When the oldest of those was published; `None` when the backlog is empty.
    pub oldest_unprocessed: Option<DateTime<Utc>>,
    /// Messages dead-lettered by this subscription.
    pub dead_letters: i64,
}

impl SubscriptionInfo {
    /// Subscription `name` of `topic`, created at `created_at`, with an empty backlog. Set the
    /// counts as they are read.
    ///
    /// For backends implementing [`Topics`] and for tests.
    pub fn new(
        name: impl Into<String>,
        topic: impl Into<String>,
        created_at: DateTime<Utc>,
    ) -> Self {
        let (name, topic) = (name.into(), topic.into());
        SubscriptionInfo {
            name,
            topic,
            created_at,
            backlog: 0,
            oldest_unprocessed: None,
            dead_letters: 0,
        }
    }
}

/// How often a subscription looks for batches whose lease expired: a receive takes them back
/// only if the last look was at least this long ago, so an expired batch comes back at most
/// this much later than its lease ended. Looking at every receive would read every batch the
/// subscription handed out since the last rotation (dead versions included while a long
/// transaction holds the database's xmin horizon); once a second it is a small, bounded cost.
pub const EXPIRED_BATCH_CHECK: Duration = Duration::from_secs(1);

/// Parameters of [`Topics::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receive {
    subscription: String,
    limit: u32,
    lease_ttl: Duration,
    holder: Option<String>,
    max_deliveries: Option<u32>,
}

impl Receive {
    /// Receive up to `limit` messages of `subscription`, leased for [`DEFAULT_LEASE_TTL`].
    pub fn new(subscription: impl Into<String>, limit: u32) -> Self {
        Receive {
            subscription: subscription.into(),
            limit,
            lease_ttl: DEFAULT_LEASE_TTL,
            holder: None,
            max_deliveries: None,
        }
    }

    /// How long the receiver holds the messages before another receive may take them back.
    /// The default value is [`DEFAULT_LEASE_TTL`] (30 s).
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// A message already delivered `n` times is dead-lettered instead of delivered again.
    /// Unlimited by default.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// Who receives (stored as the deliveries' `acquired_by`, for inspection).
    #[must_use]
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// The subscription.
    pub fn get_subscription(&self) -> &str {
        &self.subscription
    }

    /// The most messages one receive hands out.
    pub fn get_limit(&self) -> u32 {
        self.limit
    }

    /// The lease time-to-live.
    pub fn get_lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The holder, if set.
    pub fn get_holder(&self) -> Option<&str> {
        self.holder.as_deref()
    }

    /// The delivery limit, if set.
    pub fn get_max_deliveries(&self) -> Option<u32> {
        self.max_deliveries
    }

    /// Checks the parameters.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`] for a bad subscription name, [`Error::InvalidArgument`] for a
    /// zero or too large limit, a zero lease, or a zero delivery limit.
    pub fn validate(&self) -> Result<()> {
        validate_queue(&self.subscription)?;
        crate::fetch::check_limit("receive limit", self.limit)?;
        if self.lease_ttl.is_zero() {
            return Err(Error::InvalidArgument(
                "lease_ttl must be positive".to_owned(),
            ));
        }
        crate::fetch::check_max_deliveries(self.max_deliveries)
    }
}

/// What to do with received messages ([`Topics::settle`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Settlement {
    /// Processed: the subscription is done with them.
    Ack,
    /// Failed: deliver again after the delay, counting an attempt.
    Retry(RetryParams),
    /// Give up: move them to the subscription's dead letters with this reason.
    DeadLetter(String),
    /// Hand them back for immediate redelivery, counting neither an attempt nor a delivery.
    Release,
    /// Extend their lease by the lease time-to-live they were received with.
    Renew,
}

impl Settlement {
    /// Checks the settlement's arguments.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a negative or too long retry delay, or an empty or
    /// over-long dead-letter reason.
    pub fn validate(&self) -> Result<()> {
        match self {
            Settlement::Retry(params) => params.validate(),
            Settlement::DeadLetter(reason) => crate::consume::validate_reason(reason),
            _ => Ok(()),
        }
    }
}

/// Checks a message published to a topic: a valid topic name (the message's queue), and no
/// delay: a topic's messages are due when committed; a subscription delays its own retries.
///
/// # Errors
///
/// [`Error::InvalidQueue`] for a bad topic name, [`Error::InvalidArgument`] for a delayed
/// message.
pub fn validate_topic_message(message: &Message) -> Result<()> {
    message.validate()?;
    if message.available != crate::message::Availability::Now {
        return Err(Error::InvalidArgument(format!(
            "message to topic {:?} is delayed; topic messages are due when committed (retry delays are per subscription)",
            message.queue
        )));
    }
    Ok(())
}

/// Publish to topics, subscribe to them, receive and settle: the fan-out side of a backend.
///
/// Implemented by [`PgBackend`](crate::PgBackend) and `postbox_fake::FakeBroker` with the same
/// semantics (see the [module docs](crate::topic) and the testkit's conformance suite).
///
/// # Delivery contract
///
/// As for queues: at least once, and fenced. A received message is leased under the
/// receive's token; [`settle`](Self::settle) acts only on leases still held and returns the
/// ids it settled, leaving out lost ones. A lease expires after the receive's `lease_ttl`;
/// a later receive of the subscription (the first one at least [`EXPIRED_BATCH_CHECK`] after
/// the previous look for expired leases) then takes its unsettled messages back and delivers
/// them again, and the late holder can no longer settle them.
#[async_trait]
pub trait Topics: Publish {
    /// Creates `subscription` on `topic`, or finds it. Idempotent and race-free: concurrent
    /// first calls create it once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`] for a bad topic or subscription name,
    /// [`Error::SubscriptionTopic`] if the name subscribes another topic,
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: subscribing is idempotent; call again.
    async fn subscribe(&self, topic: &str, subscription: &str) -> Result<Subscribed>;

    /// Removes `subscription`; `Ok(false)` if it did not exist. Its leases, retries and dead
    /// letters go with it.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriptionNotDrained`] with [`Unsubscribe::IfDrained`],
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one transaction, so a dropped call removes the subscription or changes
    /// nothing; call again.
    async fn unsubscribe(&self, subscription: &str, pending: Unsubscribe) -> Result<bool>;

    /// The subscriptions (of `topic`, or all), by name, with their backlog.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn subscriptions(&self, topic: Option<&str>) -> Result<Vec<SubscriptionInfo>>;

    /// Publishes `messages` on the caller's connection or transaction, each to the topic
    /// named by its queue, in one statement with one notification per topic; returns what
    /// became of each, in input order. Nothing becomes visible before the caller commits.
    ///
    /// A message with an [idempotency key](Message::idempotency_key) the topic remembers is
    /// not written: [`Published::Duplicate`] carries the id of the message that has the key.
    /// Race-free: while another transaction that published the key is open, this call waits
    /// for it to end (as a unique index does), and writes the message only if that
    /// transaction rolled back. So concurrent transactions publishing one key write it once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`], [`Error::InvalidArgument`] for a delayed message or a bad
    /// key (nothing is written), [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for the transaction: dropped while its statement runs, the message may
    /// or may not be in it (a batch is one statement: all of it or none). Roll the transaction
    /// back rather than commit it.
    async fn publish_to_topics(
        &self,
        conn: &mut Self::Conn,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>>;

    /// Leases up to `params.limit` messages of the subscription under one fresh token:
    /// messages due again first (retried, released, taken back from an expired lease), then
    /// the next ones of the topic. A message delivered `max_deliveries` times already is
    /// dead-lettered instead.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSubscription`], bad parameters as [`Receive::validate`],
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a receive dropped after its statement ran leaves its messages leased
    /// until `lease_ttl` passes; they are then delivered again. Nothing is lost.
    async fn receive(&self, params: &Receive) -> Result<Vec<Delivery>>;

    /// Applies `settlement` to the messages of `leases` still held; returns the ids it
    /// applied to, in no particular order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a negative retry delay or an empty dead-letter reason,
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row. All of the leases or none.
    async fn settle(&self, leases: &[Lease], settlement: Settlement) -> Result<Vec<MessageId>>;

    /// The messages `subscription` dead-lettered, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn subscription_dead_letters(&self, subscription: &str) -> Result<Vec<DeadLetter>>;

    /// Settles a failed received message through `policy`, as [`Consume::fail`](crate::Consume::fail) does for a
    /// fetched one: retry after the policy's delay, or dead-letter when the error is a
    /// rejection or retries are exhausted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Dropped, the outcome may or may not have been applied (one statement, never half). If
    /// not, the lease expires and the message is delivered again; a stale lease never changes
    /// another holder's row.
    async fn fail_received(
        &self,
        delivery: &Delivery,
        error: &HandlerError,
        policy: &RetryPolicy,
    ) -> Result<Outcome> {
        let lease = [delivery.lease()];
        Ok(match failure_verdict(delivery, error, policy) {
            FailureVerdict::Retry { params, delay } => {
                let done = self.settle(&lease, Settlement::Retry(params)).await?;
                if done.is_empty() {
                    Outcome::LeaseLost
                } else {
                    Outcome::Retried { delay }
                }
            }
            FailureVerdict::DeadLetter { reason } => {
                let done = self
                    .settle(&lease, Settlement::DeadLetter(reason.clone()))
                    .await?;
                if done.is_empty() {
                    Outcome::LeaseLost
                } else {
                    Outcome::DeadLettered { reason }
                }
            }
        })
    }
}
