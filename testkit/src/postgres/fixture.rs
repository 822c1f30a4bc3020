//! One test's database.

use std::fmt;
use std::str::FromStr;

use postbox_core::{PgBackend, TableName};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use super::template::{DB_PREFIX, execute, redact, with_database};
use super::{Provider, Server};
use crate::error::TestkitError;

/// Connections per fixture pool: enough for a subscriber and a few concurrent calls, small
/// enough that many parallel tests fit in one server's `max_connections`.
const POOL_SIZE: u32 = 5;

/// A fresh database cloned from the migrated template, owned by one test.
///
/// Dropping it drops the database (blocking briefly, on a helper thread). Prefer
/// [`close`](Self::close) at the end of a test to do it asynchronously. When the test
/// panics, the database is kept and its name printed so you can inspect it.
pub struct PgFixture {
    pool: PgPool,
    url: String,
    admin_url: String,
    database: String,
    provider: Provider,
    shared: bool,
    closed: bool,
}

impl PgFixture {
    pub(crate) async fn create(server: &'static Server) -> Result<Self, TestkitError> {
        let database = format!("{DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let shared = server.provider == Provider::Url;
        let mut admin = PgConnection::connect(&server.url).await?;
        if shared {
            sqlx::query("INSERT INTO postbox_testkit.databases (name) VALUES ($1)")
                .bind(&database)
                .execute(&mut admin)
                .await?;
        }
        execute(
            &mut admin,
            format!(
                "CREATE DATABASE \"{database}\" TEMPLATE \"{}\"{}",
                server.template,
                if server.file_copy {
                    " STRATEGY FILE_COPY"
                } else {
                    ""
                }
            ),
        )
        .await?;
        admin.close().await?;
        let options = PgConnectOptions::from_str(&server.url)?.database(&database);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await?;
        Ok(PgFixture {
            pool,
            url: with_database(&server.url, &database),
            admin_url: server.url.clone(),
            database,
            provider: server.provider,
            shared,
            closed: false,
        })
    }

    /// A pool on this database (at most 5 connections).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The URL of this database, for code that connects by itself.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name, `postbox_test_<32 hex digits>`.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Which provider serves it.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// A backend for the default outbox table `postbox`, already migrated.
    pub fn backend(&self) -> PgBackend {
        PgBackend::new(self.pool.clone())
    }

    /// A backend for the outbox table `table`, migrated now.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Migrate`] for an invalid name or a failed migration.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the migration is one transaction; call again.
    pub async fn backend_for(&self, table: &str) -> Result<PgBackend, TestkitError> {
        let backend = PgBackend::with_table(self.pool.clone(), TableName::new(table)?);
        backend.migrate().await?;
        Ok(backend)
    }

    /// Keeps the database for inspection instead of dropping it: closes the pool and returns
    /// the database's name and its URL (password redacted). On a shared server (`url`
    /// provider) a later test process sweeps kept databases older than ten minutes; a started
    /// cluster or container goes with the test process.
    pub fn keep(mut self) -> (String, String) {
        self.closed = true;
        drop(self.pool.close());
        (self.database.clone(), redact(&self.url))
    }

    /// Closes the pool and drops the database, terminating any connection still open on it
    /// (a listener the test still holds, for example).
    ///
    /// # Errors
    ///
    /// [`TestkitError::Database`] if the server could not drop it.
    ///
    /// # Cancel safety
    ///
    /// Dropped, the database may remain; a later run's sweep (shared server) or the server's
    /// removal at exit (started cluster or container) takes it.
    pub async fn close(mut self) -> Result<(), TestkitError> {
        self.closed = true;
        // `close()` marks the pool closed at once; its future would wait for every checked-out
        // connection to come back, which a connection the test still holds never does. The
        // forced DROP below terminates them all instead.
        drop(self.pool.close());
        drop_database(&self.admin_url, &self.database, self.shared).await
    }
}

async fn drop_database(admin_url: &str, database: &str, shared: bool) -> Result<(), TestkitError> {
    let mut admin = PgConnection::connect(admin_url).await?;
    execute(
        &mut admin,
        format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"),
    )
    .await?;
    if shared {
        sqlx::query("DELETE FROM postbox_testkit.databases WHERE name = $1")
            .bind(database)
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(())
}

impl Drop for PgFixture {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "postbox-testkit: test panicked; keeping database {} for inspection ({})",
                self.database,
                redact(&self.url)
            );
            return;
        }
        // Drop cannot await, and the test's runtime may be single-threaded: do it on a
        // helper thread with its own runtime, and wait, so that "dropped" means "gone".
        let (admin_url, database, shared) =
            (self.admin_url.clone(), self.database.clone(), self.shared);
        let result = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(drop_database(&admin_url, &database, shared))
                .map_err(|e| e.to_string())
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("postbox-testkit: could not drop {}: {e}", self.database),
            Err(_) => eprintln!("postbox-testkit: dropping {} panicked", self.database),
        }
    }
}

impl fmt::Debug for PgFixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgFixture")
            .field("database", &self.database)
            .field("url", &redact(&self.url))
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}
