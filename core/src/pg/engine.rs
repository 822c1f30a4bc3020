//! The Postgres [`Engine`](crate::engine::Engine): dedicated connections for fetching and for LISTEN.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::OwnedSemaphorePermit;

use super::Inner;
use super::limit::FetchLimit;
use crate::coop::CoopReceive;
use crate::engine::{Engine, FetchSession, PermitWait, WakeUps};
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::message::Delivery;
use crate::table::TableName;

/// Makes a session reuse one generic plan per statement, planned without sequential scans
/// (see [`Engine::connect`]).
pub(crate) const GENERIC_PLANS: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off";

/// The same for one transaction only, on a pool connection that is not ours to configure.
pub(crate) const GENERIC_PLANS_LOCAL: &str =
    "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// `application_name` of the subscriber runtime's fetch connection.
pub const FETCH_APPLICATION_NAME: &str = "postbox.fetch";

/// `application_name` of the subscriber runtime's LISTEN connection.
pub const LISTEN_APPLICATION_NAME: &str = "postbox.listen";

/// The Postgres [`Engine`] of a [`PgBackend`](crate::PgBackend), returned by
/// [`Consume::engine`](crate::Consume::engine) (as a trait object) and
/// [`PgBackend::pg_engine`](crate::PgBackend::pg_engine).
///
/// A long-running consumer should not check a connection out of the pool for every fetch, and
/// a LISTEN connection must not run other statements (it would miss nothing, but a slow fetch
/// would delay wake-ups). The engine opens both **outside** the pool, with the pool's connect
/// options: size your pool for publishes and outcome writes only.
#[derive(Clone)]
pub struct PgEngine {
    pub(crate) inner: Arc<Inner>,
    pub(crate) limit: Option<Arc<FetchLimit>>,
}

impl PgEngine {
    /// The outbox table.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// The LISTEN/NOTIFY channel publishers notify: `postbox_<table>`. Each notification's
    /// payload is a queue name.
    pub fn channel(&self) -> String {
        self.inner.table.channel()
    }

    /// Opens a dedicated connection, outside the pool, for [`fetch`](Self::fetch).
    ///
    /// It uses the pool's connect options with `application_name` set to
    /// [`FETCH_APPLICATION_NAME`], so it is easy to spot in `pg_stat_activity`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server cannot be reached.
    ///
    /// The connection keeps one generic plan per statement (`plan_cache_mode =
    /// force_generic_plan`, set on this connection only). The fetch statement reads each
    /// generation of the outbox table, so planning it costs more than running it, and
    /// Postgres would otherwise plan it anew on every call (its custom plans always look
    /// cheaper than the generic one). A generic plan keeps the choices made for each
    /// generation's size when it was planned, and a generation that was empty then (a
    /// `VACUUM` of a drained generation records it as empty) is read by a sequential scan
    /// and a sort ever after, however full it gets. So the connection also plans without
    /// sequential scans (`enable_seqscan = off`): every branch of the fetch is an index scan
    /// whatever the sizes at planning time (see `docs/design/storage.md`, *Plans*).
    pub async fn connect(&self) -> Result<PgConnection> {
        let options = (*self.inner.pool.connect_options())
            .clone()
            .application_name(FETCH_APPLICATION_NAME);
        let mut conn = options.connect().await?;
        sqlx::raw_sql(GENERIC_PLANS).execute(&mut conn).await?;
        Ok(conn)
    }

    /// Opens a dedicated LISTEN connection, outside the pool, already listening on
    /// [`channel`](Self::channel), with `application_name` [`LISTEN_APPLICATION_NAME`].
    ///
    /// Notifications sent while it is disconnected are lost (sqlx's `recv` reconnects
    /// quietly; `try_recv` reports the loss as `Ok(None)`): fetch after every (re)connect.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server cannot be reached or refuses
    /// LISTEN (some poolers do).
    pub async fn listener(&self) -> Result<PgListener> {
        #[cfg(feature = "test-util")]
        if self.inner.take_listen_fault() {
            return Err(crate::Error::Injected("LISTEN refused (test fault)".into()));
        }
        let options = (*self.inner.pool.connect_options())
            .clone()
            .application_name(LISTEN_APPLICATION_NAME);
        // A private one-connection pool: the listener reconnects through it, never through
        // (and never starving) the application's pool.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(self.inner.pool.options().get_acquire_timeout())
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&self.channel()).await?;
        Ok(listener)
    }

    /// Runs the fetch statement on `conn`, typically the connection from
    /// [`connect`](Self::connect). Same semantics as [`Consume::fetch`](crate::Consume::fetch).
    ///
    /// Waits for a permit first when the backend caps concurrent fetches
    /// ([`PgBackend::max_concurrent_fetches`](crate::PgBackend::max_concurrent_fetches)).
    ///
    /// # Errors
    ///
    /// As [`Consume::fetch`](crate::Consume::fetch).
    pub async fn fetch(
        &self,
        conn: &mut PgConnection,
        params: &FetchParams,
    ) -> Result<Vec<Delivery>> {
        let _permit = self.permit().await;
        self.inner.fetch_on(conn, params).await
    }

    /// Runs the cooperative receive on `conn`. Same semantics as
    /// [`Coop::coop_receive`](crate::Coop::coop_receive).
    ///
    /// Waits for a permit first, like [`fetch`](Self::fetch).
    ///
    /// # Errors
    ///
    /// As [`Coop::coop_receive`](crate::Coop::coop_receive).
    pub async fn coop_receive(
        &self,
        conn: &mut PgConnection,
        params: &CoopReceive,
    ) -> Result<Vec<Delivery>> {
        let _permit = self.permit().await;
        self.inner.coop_receive_on(conn, params).await
    }

    /// A fetch permit when fetches are capped (held while the statement runs), else `None`.
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.limit.as_ref()?.acquire().await
    }
}

#[async_trait]
impl Engine for PgEngine {
    fn table(&self) -> &TableName {
        &self.inner.table
    }

    async fn open_session(&self) -> Result<Box<dyn FetchSession>> {
        let mut conn = self.connect().await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        Ok(Box::new(PgFetchSession {
            inner: Arc::clone(&self.inner),
            conn,
            pid,
        }))
    }

    async fn open_wake_ups(&self) -> Result<Box<dyn WakeUps>> {
        let mut listener = self.listener().await?;
        // Report a lost connection instead of reconnecting quietly: notifications sent
        // meanwhile are lost, and the runtime must fetch after every reconnect.
        listener.eager_reconnect(false);
        Ok(Box::new(PgWakeUps { listener }))
    }

    fn permit_wait(&self) -> Option<PermitWait> {
        let limit = Arc::clone(self.limit.as_ref()?);
        Some(Box::pin(async move { limit.acquire().await }))
    }
}

/// The fetch connection of [`PgEngine::open_session`]. The runtime holds the fetch permit (if
/// fetches are capped) while it calls these, so they run the statements directly rather than
/// through [`PgEngine::fetch`], which would queue for a permit again.
struct PgFetchSession {
    inner: Arc<Inner>,
    conn: PgConnection,
    pid: i32,
}

#[async_trait]
impl FetchSession for PgFetchSession {
    fn id(&self) -> i64 {
        self.pid.into()
    }

    async fn fetch(&mut self, params: &FetchParams) -> Result<Vec<Delivery>> {
        self.inner.fetch_on(&mut self.conn, params).await
    }

    async fn coop_receive(&mut self, params: &CoopReceive) -> Result<Vec<Delivery>> {
        self.inner.coop_receive_on(&mut self.conn, params).await
    }

    async fn close(self: Box<Self>) {
        let _ = self.conn.close().await;
    }
}

/// The LISTEN connection of [`PgEngine::open_wake_ups`]: each notification's payload is the
/// queue that got a commit.
struct PgWakeUps {
    listener: PgListener,
}

#[async_trait]
impl WakeUps for PgWakeUps {
    async fn next(&mut self) -> Result<Option<String>> {
        Ok(self
            .listener
            .try_recv()
            .await?
            .map(|notification| notification.payload().to_owned()))
    }

    async fn check(&mut self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&mut self.listener).await?;
        Ok(())
    }
}

impl fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEngine")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}
