//! Where a statement outside the caller's transaction runs.
//!
//! sqlx runs a statement with parameters as two protocol exchanges, each ending in `Sync`:
//! `Parse` + `Describe` (to learn the parameter and column types), then `Bind` + `Execute`.
//! Connected straight to Postgres, or through a pooler in session mode, both reach the same
//! server session. A pooler in transaction mode hands the server session back at every
//! `Sync` that leaves no transaction open, so the `Bind` of the second exchange may reach
//! another server session: there the unnamed statement is missing (`unnamed prepared
//! statement does not exist`) or is another client's (`bind message supplies 4 parameters,
//! but prepared statement "" requires 2`). Behind such a pooler every statement therefore
//! runs in a transaction of its own, which holds one server session from `BEGIN` to
//! `COMMIT`: two more round trips per statement, the price of a transaction pooler.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// One pool connection for one statement, inside a transaction of its own behind a
/// transaction pooler. Finish it with [`done`](Self::done); dropping it instead rolls that
/// transaction back (the statement's work is lost, as when its connection breaks).
pub(crate) enum Session {
    /// A plain pool connection: the statement commits on its own.
    Direct(PoolConnection<Postgres>),
    /// A transaction that pins the pooler's server session for the statement's exchanges.
    Pinned(Transaction<'static, Postgres>),
}

impl Session {
    /// A session on `pool`: pinned in a transaction unless statements may be named
    /// (`persistent`), which is exactly when no transaction pooler stands in between.
    pub(crate) async fn on(pool: &PgPool, persistent: bool) -> Result<Self, sqlx::Error> {
        Ok(if persistent {
            Session::Direct(pool.acquire().await?)
        } else {
            Session::Pinned(pool.begin().await?)
        })
    }

    /// Commits the statement's transaction, if there is one.
    pub(crate) async fn done(self) -> Result<(), sqlx::Error> {
        match self {
            Session::Direct(_) => Ok(()),
            Session::Pinned(tx) => tx.commit().await,
        }
    }
}

impl Deref for Session {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Session::Direct(conn) => conn,
            Session::Pinned(tx) => tx,
        }
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Session::Direct(conn) => conn,
            Session::Pinned(tx) => tx,
        }
    }
}
