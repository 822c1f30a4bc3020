//! The engine: what a backend with server-side sessions offers the subscriber runtime beyond
//! the [`Backend`](crate::Backend) calls, without the runtime knowing which database it is.
//!
//! A long-running consumer should not check a connection out of the pool for every fetch,
//! and should hear about commits instead of polling for them. A backend that can do better
//! than polling returns an [`Engine`] from [`Consume::engine`](crate::Consume::engine): a
//! [`FetchSession`] the runtime keeps across fetches, and [`WakeUps`] telling it which queues
//! got commits. Postgres does ([`PgEngine`](crate::pg::PgEngine): a dedicated connection, and
//! `LISTEN`); the in-memory fake does not, and the runtime polls it.
//!
//! To give a new backend an engine, implement the three traits; the runtime drives them
//! (reconnecting, health checks, backoff) and the backend owns its connections and limits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::sync::OwnedSemaphorePermit;

use crate::coop::CoopReceive;
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::message::Delivery;
use crate::table::TableName;

/// A pending wait for a fetch permit ([`Engine::permit_wait`]): resolves to the permit, or to
/// `None` if the limit was closed.
pub type PermitWait = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

/// A backend's server-side sessions, for the subscriber runtime.
#[async_trait]
pub trait Engine: Send + Sync + fmt::Debug {
    /// The outbox table it serves, for logs.
    fn table(&self) -> &TableName;

    /// Opens a session to fetch on, kept by the runtime until an error or shutdown.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a session dropped before it is returned is closed.
    async fn open_session(&self) -> Result<Box<dyn FetchSession>>;

    /// Opens the source of wake-ups: a session that hears about commits. Wake-ups sent while
    /// it is not open are lost, so the runtime fetches after every (re)open.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server cannot be reached or refuses
    /// to notify (some poolers do); the runtime polls meanwhile.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a source dropped before it is returned is closed.
    async fn open_wake_ups(&self) -> Result<Box<dyn WakeUps>>;

    /// A place in the queue for a fetch permit when the backend caps concurrent fetches,
    /// else `None`. The runtime keeps it across loop turns (dropping it gives the place up)
    /// and holds the granted permit while its fetch runs.
    fn permit_wait(&self) -> Option<PermitWait>;
}

/// A dedicated session the runtime fetches on.
#[async_trait]
pub trait FetchSession: Send {
    /// The server's id of this session, for events and logs (on Postgres, the backend pid).
    fn id(&self) -> i64;

    /// As [`Consume::fetch`](crate::Consume::fetch), on this session.
    ///
    /// # Errors
    ///
    /// As [`Consume::fetch`](crate::Consume::fetch); the runtime then drops the session.
    ///
    /// # Cancel safety
    ///
    /// As [`Consume::fetch`](crate::Consume::fetch).
    async fn fetch(&mut self, params: &FetchParams) -> Result<Vec<Delivery>>;

    /// As [`Coop::coop_receive`](crate::Coop::coop_receive), on this session.
    ///
    /// # Errors
    ///
    /// As [`Coop::coop_receive`](crate::Coop::coop_receive).
    ///
    /// # Cancel safety
    ///
    /// As [`Coop::coop_receive`](crate::Coop::coop_receive).
    async fn coop_receive(&mut self, params: &CoopReceive) -> Result<Vec<Delivery>>;

    /// Closes the session politely (dropping it closes it too, abruptly).
    async fn close(self: Box<Self>);
}

/// Wake-ups: which queues got commits.
#[async_trait]
pub trait WakeUps: Send {
    /// The next queue that got a commit; `Ok(None)` when the source is gone (the runtime
    /// opens another).
    ///
    /// # Errors
    ///
    /// The source failed; the runtime opens another.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call loses no wake-up.
    async fn next(&mut self) -> Result<Option<String>>;

    /// Checks that the source still answers (the runtime bounds it with a timeout).
    ///
    /// # Errors
    ///
    /// The source does not answer; the runtime opens another.
    async fn check(&mut self) -> Result<()>;
}
