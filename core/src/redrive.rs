//! Dead-letter redrive: putting dead letters back on their queues, or purging them.
//!
//! A message lands in the dead-letter table when its handler rejected it, its retries ran
//! out, or it was leased `max_deliveries` times without an outcome. Once the cause is fixed
//! (a bug deployed away, a downstream service back), an operator wants those messages
//! handled after all, or gone for good. [`Redrive`] does either for the dead letters a
//! [`DeadFilter`] selects, atomically: each selected dead letter is moved or deleted exactly
//! once, even when two operators redrive the same letters at the same time.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::inspect::DeadLetter;
use crate::message::{MessageId, validate_queue};
use crate::topic::Topics;

/// Which dead letters a [`Redrive`] call selects: those meeting every condition given.
///
/// [`DeadFilter::all`] selects every dead letter; the builder methods narrow it. The same
/// filter selects the same letters on every backend (conformance-tested), and
/// [`matches`](Self::matches) applies it to a listing, for a dry run.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::DeadFilter;
///
/// // What the payments outage dead-lettered, once it is at least ten minutes old.
/// let filter = DeadFilter::all()
///     .queue("payments")
///     .reason_contains("connection refused")
///     .older_than(Duration::from_secs(600));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    ids: Option<Vec<MessageId>>,
    queue: Option<String>,
    reason_contains: Option<String>,
    older_than: Option<Duration>,
}

impl DeadFilter {
    /// Every dead letter.
    #[must_use]
    pub fn all() -> Self {
        DeadFilter::default()
    }

    /// The dead letters with these ids (ids that are not dead letters select nothing).
    #[must_use]
    pub fn ids(ids: impl IntoIterator<Item = MessageId>) -> Self {
        DeadFilter {
            ids: Some(ids.into_iter().collect()),
            ..DeadFilter::default()
        }
    }

    /// Only dead letters of `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only dead letters whose reason contains `text` (case-sensitive, anywhere in it).
    #[must_use]
    pub fn reason_contains(mut self, text: impl Into<String>) -> Self {
        self.reason_contains = Some(text.into());
        self
    }

    /// Only dead letters dead-lettered at least `age` ago, by the backend's clock.
    #[must_use]
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// The ids condition, if any.
    pub fn get_ids(&self) -> Option<&[MessageId]> {
        self.ids.as_deref()
    }

    /// The queue condition, if any.
    pub fn get_queue(&self) -> Option<&str> {
        self.queue.as_deref()
    }

    /// The reason condition, if any.
    pub fn get_reason_contains(&self) -> Option<&str> {
        self.reason_contains.as_deref()
    }

    /// The age condition, if any.
    pub fn get_older_than(&self) -> Option<Duration> {
        self.older_than
    }

    /// Whether `dead` meets every condition, `now` being the backend's clock.
    pub fn matches(&self, dead: &DeadLetter, now: DateTime<Utc>) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(&dead.id))
            && self.queue.as_ref().is_none_or(|q| *q == dead.queue)
            && self
                .reason_contains
                .as_ref()
                .is_none_or(|text| dead.reason.contains(text.as_str()))
            && self.older_than.is_none_or(|age| {
                // An age beyond chrono's range selects nothing rather than everything.
                chrono::Duration::from_std(age).is_ok_and(|age| now - dead.dead_at >= age)
            })
    }

    /// Refuses what no backend could match: an invalid queue name, a NUL in the reason text,
    /// an age above [`MAX_DELAY`](crate::MAX_DELAY). Every backend runs it first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`](crate::Error::InvalidQueue) for the queue,
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the field otherwise.
    pub fn validate(&self) -> Result<()> {
        if let Some(queue) = &self.queue {
            validate_queue(queue)?;
        }
        if let Some(text) = &self.reason_contains {
            crate::validate::text("dead-letter reason filter", text)?;
        }
        if let Some(age) = self.older_than {
            crate::validate::delay("dead-letter age filter", age)?;
        }
        Ok(())
    }
}

/// Putting dead letters back on their queues (or in their subscriptions), or deleting them,
/// by a [`DeadFilter`].
///
/// Each call runs as one statement (Postgres) or under one lock (the fake): either every
/// selected dead letter is moved or deleted, or none is. Two calls racing over the same
/// letters split them: each letter is requeued or purged by exactly one of them.
///
/// On Postgres a queue's redrive needs `SELECT, DELETE` on `T_dead` and, to requeue, what a
/// publisher has: of the roles [`PgBackend::grants`](crate::PgBackend::grants) knows, only
/// [`Access::Admin`](crate::pg::Access::Admin). A subscription's needs what settling needs, so
/// [`Access::Consumer`](crate::pg::Access::Consumer) has it.
///
/// ```no_run
/// # async fn run(backend: postbox_core::PgBackend) -> postbox_core::Result<()> {
/// use postbox_core::prelude::*;
/// use postbox_core::DeadFilter;
///
/// let filter = DeadFilter::all().queue("payments").reason_contains("connection refused");
/// // A dry run: what the filter selects now, by the database's clock.
/// let now = backend.database_now().await?;
/// let dead = backend.dead_letters(Some("payments")).await?;
/// let selected = dead.iter().filter(|d| filter.matches(d, now)).count();
/// println!("{selected} dead letters would be requeued");
/// // The real thing: moved atomically, each exactly once.
/// let requeued = backend.requeue_dead(&filter).await?;
/// println!("requeued {requeued:?}");
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait Redrive: Topics {
    /// Moves the selected dead letters back to their queues, ready at once, with their id,
    /// queue, payload, headers, correlation id and publish time, and their history cleared:
    /// no attempts, no deliveries, no last error, so retry policies and `max_deliveries`
    /// start afresh. Subscribers of those queues are woken as by a publish. Returns the ids
    /// requeued, in id order.
    ///
    /// # Errors
    ///
    /// What [`DeadFilter::validate`] refuses (nothing is moved);
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one statement, so a dropped call moved every selected dead letter back or
    /// none; call again (a requeued letter is not selected twice).
    async fn requeue_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>>;

    /// Deletes the selected dead letters for good. Returns the ids deleted, in id order.
    ///
    /// # Errors
    ///
    /// As [`requeue_dead`](Self::requeue_dead).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one statement, so a dropped call deleted every selected dead letter or
    /// none; call again.
    async fn purge_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>>;

    /// Makes the selected dead letters of `subscription` due again in that subscription
    /// only (its [`subscription_dead_letters`](Topics::subscription_dead_letters); the
    /// filter's queue condition matches their topic), their history cleared as by
    /// [`requeue_dead`](Self::requeue_dead), and wakes the topic's receivers. Other
    /// subscriptions of the topic are untouched. An unknown subscription selects nothing.
    /// Returns the ids requeued, in id order.
    ///
    /// # Errors
    ///
    /// As [`requeue_dead`](Self::requeue_dead), and
    /// [`Error::InvalidQueue`](crate::Error::InvalidQueue) for a bad subscription name.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one statement, so a dropped call moved every selected dead letter back or
    /// none; call again.
    async fn requeue_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>>;

    /// Deletes the selected dead letters of `subscription` for good. Returns the ids
    /// deleted, in id order.
    ///
    /// # Errors
    ///
    /// As [`requeue_subscription_dead`](Self::requeue_subscription_dead).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one statement, so a dropped call deleted every selected dead letter or
    /// none; call again.
    async fn purge_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(id: MessageId, queue: &str, reason: &str, dead_at: DateTime<Utc>) -> DeadLetter {
        DeadLetter::new(crate::Envelope::new(id, queue, Vec::new()), reason, dead_at)
    }

    #[test]
    fn every_condition_must_hold() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::hours(1);
        let old = dead(
            1,
            "a",
            "timeout talking to x",
            now - chrono::Duration::minutes(30),
        );
        let new = dead(2, "a", "timeout", now - chrono::Duration::minutes(1));
        let other = dead(3, "b", "bad input", now - chrono::Duration::minutes(30));
        let pick = |f: DeadFilter| {
            [&old, &new, &other]
                .into_iter()
                .filter(|d| f.matches(d, now))
                .map(|d| d.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(DeadFilter::all()), [1, 2, 3]);
        assert_eq!(pick(DeadFilter::all().queue("a")), [1, 2]);
        assert_eq!(pick(DeadFilter::all().reason_contains("timeout")), [1, 2]);
        assert_eq!(
            pick(DeadFilter::all().reason_contains("Timeout")),
            [] as [i64; 0]
        );
        let ten_minutes = Duration::from_secs(600);
        assert_eq!(pick(DeadFilter::all().older_than(ten_minutes)), [1, 3]);
        assert_eq!(pick(DeadFilter::ids([2, 3, 99]).queue("a")), [2]);
        assert_eq!(pick(DeadFilter::ids([])), [] as [i64; 0]);
        // Exactly the age selects (at least `age` ago).
        assert_eq!(
            pick(DeadFilter::all().older_than(Duration::from_secs(60))),
            [1, 2, 3]
        );
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(DeadFilter::all().queue("").validate().is_err());
        assert!(
            DeadFilter::all()
                .reason_contains("a\0b")
                .validate()
                .is_err()
        );
        assert!(
            DeadFilter::all()
                .older_than(crate::MAX_DELAY + Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(DeadFilter::ids([1]).queue("q").validate().is_ok());
    }
}
