//! Moving a backend's clock in tests.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postbox_core::{PgBackend, Result, Store};
use postbox_fake::FakeBroker;

/// A backend whose clock a test can read and move forward: the fake's own clock, or the time
/// a [`PgBackend`]'s statements read (pinned with its `test-util` clock).
///
/// After the first [`advance`](Self::advance) on Postgres the clock stays pinned (it no longer
/// moves by itself), so a test decides exactly when leases expire and delays pass.
#[async_trait]
pub trait TimeControl: Store {
    /// The backend's current time.
    ///
    /// # Errors
    ///
    /// A database error reading the clock.
    async fn now(&self) -> Result<DateTime<Utc>>;

    /// Moves the clock forward by `by`.
    ///
    /// # Errors
    ///
    /// A database error reading the clock.
    async fn advance(&self, by: Duration) -> Result<()>;
}

#[async_trait]
impl TimeControl for FakeBroker {
    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(FakeBroker::now(self))
    }

    async fn advance(&self, by: Duration) -> Result<()> {
        FakeBroker::advance(self, by);
        Ok(())
    }
}

#[async_trait]
impl TimeControl for PgBackend {
    async fn now(&self) -> Result<DateTime<Utc>> {
        self.database_now().await
    }

    async fn advance(&self, by: Duration) -> Result<()> {
        let now = self.database_now().await?;
        self.set_now(Some(
            now + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX),
        ));
        Ok(())
    }
}
