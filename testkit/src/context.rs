//! What a test written once for both backends receives.

use async_trait::async_trait;
use postbox_core::{Backend, Depth, PgBackend, Redrive, Result, StoredMessage, Topics};
use postbox_fake::{FakeBroker, FakeConn};
use sqlx::{PgConnection, PgPool};

use crate::live::JournalLiveControl;
use crate::time::TimeControl;

/// A backend a test can run on: everything the testkit's helpers use, implemented by
/// [`FakeBroker`] and [`PgBackend`].
///
/// Write a test body generic over it (`b: impl TestBackend`) and it means the same on both:
/// that is what `#[postbox::test]` runs, and what the [conformance suite](crate::conformance)
/// is written against.
#[async_trait]
pub trait TestBackend:
    Backend
    + Topics
    + Redrive
    + Depth
    + TimeControl
    + JournalLiveControl
    + Clone
    + Send
    + Sync
    + 'static
{
    /// `"fake"` or `"postgres"`, for messages.
    const NAME: &'static str;

    /// The messages of `queue` (or of all queues), in id order, as the open transaction
    /// `conn` sees them: committed ones and its own uncommitted publishes.
    ///
    /// # Errors
    ///
    /// A database error (on Postgres, it aborts the transaction).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only (on Postgres, drain the dropped statement's result by using the
    /// transaction again, or roll it back).
    async fn messages_in(
        &self,
        conn: &mut Self::Conn,
        queue: Option<&str>,
    ) -> Result<Vec<StoredMessage>>;
}

#[async_trait]
impl TestBackend for FakeBroker {
    const NAME: &'static str = "fake";

    async fn messages_in(
        &self,
        conn: &mut FakeConn,
        queue: Option<&str>,
    ) -> Result<Vec<StoredMessage>> {
        Ok(FakeBroker::messages_in(self, conn, queue))
    }
}

#[async_trait]
impl TestBackend for PgBackend {
    const NAME: &'static str = "postgres";

    async fn messages_in(
        &self,
        conn: &mut PgConnection,
        queue: Option<&str>,
    ) -> Result<Vec<StoredMessage>> {
        PgBackend::messages_in(self, conn, queue).await
    }
}

/// One run of a `#[postbox::test]`: the backend, and on Postgres the fixture database behind
/// it.
///
/// Take it instead of the bare backend when the test needs the database itself, for instance
/// to read the rows your own code wrote in the same transaction as its messages:
///
/// ```no_run
/// use postbox_testkit::{TestBackend, TestContext};
///
/// // #[postbox::test]
/// async fn knows_where_it_runs(ctx: TestContext<impl TestBackend>) {
///     match ctx.pool() {
///         Some(pool) => assert!(sqlx::query("SELECT 1").execute(pool).await.is_ok()),
///         None => assert_eq!(ctx.backend_name(), "fake"),
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct TestContext<B> {
    backend: B,
    database: Option<Database>,
}

/// The Postgres side of a context.
#[derive(Debug, Clone)]
struct Database {
    pool: PgPool,
    name: String,
}

impl<B: TestBackend> TestContext<B> {
    /// The backend under test: a new [`FakeBroker`], or a [`PgBackend`] on a fresh database.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// `"fake"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        B::NAME
    }

    /// A pool on the fixture database (at most 5 connections); `None` on the fake.
    pub fn pool(&self) -> Option<&PgPool> {
        self.database.as_ref().map(|d| &d.pool)
    }

    /// The fixture database's name (`postbox_test_<hex>`); `None` on the fake.
    pub fn database(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.name.as_str())
    }
}

impl TestContext<FakeBroker> {
    pub(crate) fn fake() -> Self {
        TestContext {
            backend: FakeBroker::new(),
            database: None,
        }
    }
}

impl TestContext<PgBackend> {
    pub(crate) fn postgres(backend: PgBackend, pool: PgPool, name: String) -> Self {
        TestContext {
            backend,
            database: Some(Database { pool, name }),
        }
    }

    /// The fixture's pool; a Postgres context always has one.
    pub(crate) fn pg_pool(&self) -> &PgPool {
        match &self.database {
            Some(d) => &d.pool,
            None => unreachable!("a Postgres test context is built with its database"),
        }
    }
}
