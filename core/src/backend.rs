//! The backend trait every postbox store implements, and its parameter and result types.

use std::ops::DerefMut;
use std::time::Duration;

use async_trait::async_trait;

use crate::coop::{CoopReceive, Member, MemberInfo, Registration, Unregister};
use crate::engine::Engine;
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::inspect::{DeadLetter, StoredMessage};
use crate::journal::{JournalEvent, LiveEvents};
use crate::message::{Delivery, Lease, Message, MessageId};
use crate::outcome::Outcome;
use crate::retry::{HandlerError, RetryDecision, RetryPolicy};
use crate::table::TableName;

/// A message store: publish inside a transaction, lease with fetch, settle with fenced outcomes.
///
/// Implemented by [`PgBackend`](crate::PgBackend) (Postgres) and by `postbox_fake::FakeBroker`
/// (in memory, same semantics). Code generic over `Backend` — the subscriber runtime, the
/// testkit's helpers and its conformance suite — behaves the same on both.
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
pub trait Backend: Send + Sync + 'static {
    /// What publishes run on: the caller's connection or open transaction
    /// (`sqlx::PgConnection` for Postgres).
    type Conn: ?Sized + Send;

    /// A transaction begun by [`begin`](Self::begin); dereferences to [`Conn`](Self::Conn).
    type Tx: DerefMut<Target = Self::Conn> + Send;

    /// The outbox table this backend reads and writes.
    fn table(&self) -> &TableName;

    /// The backend's [`Engine`], if it has one: server-side sessions the runtime keeps.
    ///
    /// `Some` lets the subscriber runtime hold a persistent fetch connection and a LISTEN
    /// connection; `None` (the fake) makes it poll and open no connection at all.
    fn engine(&self) -> Option<&dyn Engine>;

    /// Whether the backend was shut down for good (for Postgres: its pool was closed). A
    /// subscriber whose backend is closed stops instead of retrying forever.
    fn is_closed(&self) -> bool {
        false
    }

    /// Begins a transaction to publish in.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if no connection could be acquired.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a transaction dropped before it is returned rolls back, and its connection
    /// goes back to the pool.
    async fn begin(&self) -> Result<Self::Tx>;

    /// Commits `tx`: its messages become visible to fetch and wake-ups are sent.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the commit fails; then nothing was published.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once the commit is sent, a dropped call leaves the transaction
    /// committed or not, as any database commit. Its messages are then all published or none.
    async fn commit(&self, tx: Self::Tx) -> Result<()>;

    /// Rolls `tx` back: its messages and wake-ups are discarded. Dropping a transaction does
    /// the same.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the connection failed (the transaction is gone either way).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped transaction rolls back anyway.
    async fn rollback(&self, tx: Self::Tx) -> Result<()>;

    /// Publishes one message on the caller's connection or transaction and returns its id.
    ///
    /// Never begins, commits or rolls back: the message (and its wake-up notification) become
    /// visible when the caller's transaction commits, and vanish if it rolls back.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`](crate::Error::InvalidQueue) for an empty or over-long queue name (nothing is written),
    /// [`Error::Database`](crate::Error::Database) if the insert fails.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for the transaction: dropped while its statement runs, the message may
    /// or may not be in it (a batch is one statement: all of it or none). Roll the transaction
    /// back rather than commit it.
    async fn publish(&self, conn: &mut Self::Conn, message: Message) -> Result<MessageId>;

    /// Publishes many messages in one statement and returns their ids, in input order.
    ///
    /// One wake-up per distinct queue. An empty batch is a no-op that touches nothing.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish); one invalid message rejects the whole batch before
    /// anything is written.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for the transaction: dropped while its statement runs, the message may
    /// or may not be in it (a batch is one statement: all of it or none). Roll the transaction
    /// back rather than commit it.
    async fn publish_batch(
        &self,
        conn: &mut Self::Conn,
        messages: Vec<Message>,
    ) -> Result<Vec<MessageId>>;

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

    /// Registers `member` for `queues`; idempotent and race-free: of concurrent first
    /// registrations exactly one reports [`Registration::New`]. Refreshes the heartbeat.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: registration is idempotent; call again.
    async fn coop_register(&self, member: &Member, queues: &[String]) -> Result<Registration>;

    /// Leases up to `max_messages` rows to the member under a fresh token, registering it on
    /// first use and stamping its heartbeat. Takes ready rows and, with a `dead_interval`,
    /// rows held by siblings silent for longer than that (their outcomes then report
    /// `false`). Rows held by live siblings are never taken, whatever their lease age.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), [`Error::InvalidQueue`](crate::Error::InvalidQueue), [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in the at-least-once sense: dropped after the database leased the rows to
    /// the member, they are not returned and are delivered again once `lease_ttl` has passed.
    /// Nothing is lost.
    async fn coop_receive(&self, params: &CoopReceive) -> Result<Vec<Delivery>>;

    /// The heartbeat: marks `member` alive now. `Ok(false)` if it is not registered.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a heartbeat; touching again is harmless.
    async fn coop_touch(&self, member: &Member) -> Result<bool>;

    /// Removes `member` from its group; see [`Unregister`] for the rows it holds. `Ok(false)`
    /// if it was not registered (a second unregister).
    ///
    /// # Errors
    ///
    /// [`Error::MemberHoldsMessages`](crate::Error::MemberHoldsMessages) with [`Unregister::Fail`] while it holds rows;
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one transaction, so a dropped call unregisters the member (with its rows
    /// handled) or changes nothing; call again.
    async fn coop_unregister(&self, member: &Member, handling: Unregister) -> Result<bool>;

    /// The members of `group`, by name, with what each holds.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn coop_members(&self, group: &str) -> Result<Vec<MemberInfo>>;

    /// Writes `events` durably in one transaction (one multi-row insert).
    ///
    /// # Errors
    ///
    /// [`Error::SeqConflict`](crate::Error::SeqConflict) if a `(stream, seq)` is taken (nothing is written);
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// One statement, all of the events or none: dropped, they may or may not be stored.
    /// Appending the same seqs again then reports `Error::SeqConflict` if they were.
    async fn journal_append(&self, events: &[JournalEvent]) -> Result<()>;

    /// The highest seq written in `stream`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn journal_latest_seq(&self, stream: &str) -> Result<Option<i64>>;

    /// Up to `limit` committed events of `stream` with `seq > after`, in seq order.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn journal_read_after(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JournalEvent>>;

    /// Publishes `event` on the stream's live channel (not durable), if the backend's
    /// [`JournalLive`](crate::JournalLive) sends payloads; under the default,
    /// `JournalLive::Stored`, it only validates the event: events go live when
    /// [`journal_append`](Self::journal_append) stores them.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the live notification may or may not have been sent; readers catch up from the
    /// stored journal.
    async fn journal_publish(&self, event: &JournalEvent) -> Result<()>;

    /// Publishes several events live, in order; backends may send them in one round trip.
    /// Defaults to one [`journal_publish`](Self::journal_publish) per event.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the live notifications may or may not have been sent; readers catch up from the
    /// stored journal.
    async fn journal_publish_batch(&self, events: &[JournalEvent]) -> Result<()> {
        for event in events {
            self.journal_publish(event).await?;
        }
        Ok(())
    }

    /// Subscribes to `stream`'s live channel.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the channel cannot be listened to.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no subscription behind (its connection is closed).
    async fn journal_subscribe(&self, stream: &str) -> Result<LiveEvents>;

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
        let elapsed = (delivery.acquired_at - delivery.first_attempt_at)
            .to_std()
            .unwrap_or_default();
        match policy.decide(delivery.attempts, elapsed, error) {
            RetryDecision::Retry { delay } => {
                // A handler's message is stored as given, but for NUL characters (which
                // Postgres cannot store) and a policy delay beyond what it can add.
                let params = RetryParams::new(delay.min(crate::MAX_DELAY))
                    .error(crate::validate::storable(error.message()));
                Ok(if self.retry(delivery.lease(), params).await? {
                    Outcome::Retried { delay }
                } else {
                    Outcome::LeaseLost
                })
            }
            RetryDecision::DeadLetter { reason } => {
                let reason = crate::validate::storable(&reason).into_owned();
                Ok(if self.dead_letter(delivery.lease(), &reason).await? {
                    Outcome::DeadLettered { reason }
                } else {
                    Outcome::LeaseLost
                })
            }
        }
    }
}

/// Parameters of [`Backend::retry`].
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
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The error to record.
    pub fn error_message(&self) -> Option<&str> {
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
