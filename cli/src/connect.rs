//! Which outbox the command works on, and the connection to it.

use std::time::Duration;

use anyhow::Context;
use postbox_core::pg::Rotation;
use postbox_core::{PgBackend, TableName};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

/// The options every command shares.
#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// The Postgres URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// The outbox table: `name`, or `schema.name` for one in its own schema.
    #[arg(long, default_value = "postbox", global = true)]
    table: String,
}

impl Target {
    /// The table, validated.
    pub(crate) fn table(&self) -> anyhow::Result<TableName> {
        let table = match self.table.split_once('.') {
            Some((schema, name)) => TableName::in_schema(schema, name),
            None => TableName::new(self.table.as_str()),
        };
        table.with_context(|| format!("--table {:?}", self.table))
    }

    /// A backend on the table, over a small pool. Its rotation does not run by itself: a
    /// command changes only what it says.
    pub(crate) async fn backend(&self) -> anyhow::Result<PgBackend> {
        let table = self.table()?;
        let url = self
            .database_url
            .as_deref()
            .context("no database: set DATABASE_URL or pass --database-url")?;
        let options: PgConnectOptions = url.parse().context("reading the database URL")?;
        // One connection first: a pool retries a refused connection until its timeout, and a
        // command should say at once that the server is not there.
        let probe = PgConnection::connect_with(&options)
            .await
            .context("connecting to the database")?;
        probe.close().await.context("connecting to the database")?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy_with(options);
        Ok(PgBackend::with_table(pool, table).rotation(Rotation::new().automatic(false)))
    }
}
