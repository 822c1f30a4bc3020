//! [`Publish`]: transactions and publishing, the capability application code uses.

use std::ops::DerefMut;

use async_trait::async_trait;

use crate::error::Result;
use crate::message::{Message, MessageId};
use crate::store::Store;

/// Publishes messages inside the caller's transaction.
///
/// The transactional-outbox half of a backend: a message becomes visible to fetch when the
/// transaction it was published in commits, and vanishes if it rolls back.
#[async_trait]
pub trait Publish: Store {
    /// What publishes run on: the caller's connection or open transaction
    /// (`sqlx::PgConnection` for Postgres).
    type Conn: ?Sized + Send;

    /// A transaction begun by [`begin`](Self::begin); dereferences to [`Conn`](Self::Conn).
    type Tx: DerefMut<Target = Self::Conn> + Send;

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
}
