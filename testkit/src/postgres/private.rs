//! A private local cluster, for tests that disturb the server itself.

use parking_lot::Mutex;

use super::local::{self, LocalCluster};
use crate::error::TestkitError;

/// A Postgres cluster of this test alone, from the local binaries (run as an unprivileged
/// user when the test runs as root), for fault tests that restart or stop the server: the
/// shared server behind [`postgres()`](super::postgres()) is never disturbed.
///
/// The cluster is stopped and its directory removed when this is dropped (and, like every
/// local cluster, when the test process dies).
///
/// ```no_run
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// use postbox_testkit::LocalServer;
///
/// let server = tokio::task::spawn_blocking(LocalServer::start).await??;
/// let pool = sqlx::PgPool::connect(&server.url("postgres")).await?;
/// // ... run work against `pool` ...
/// tokio::task::spawn_blocking({ let s = server.clone(); move || s.restart() }).await??;
/// // ... connections were closed; the pool reconnects ...
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LocalServer {
    cluster: std::sync::Arc<Mutex<LocalCluster>>,
}

impl LocalServer {
    /// Runs `initdb` and starts the server on a private unix socket (blocking: call it from
    /// `spawn_blocking` in async code).
    ///
    /// # Errors
    ///
    /// [`TestkitError::NoServer`] when the Postgres binaries are missing or the server does
    /// not start, with the reason.
    pub fn start() -> Result<Self, TestkitError> {
        let cluster = local::start().map_err(|why| TestkitError::NoServer {
            tried: format!("  local: {why}"),
            image: super::DEFAULT_IMAGE.to_owned(),
        })?;
        Ok(LocalServer {
            cluster: std::sync::Arc::new(Mutex::new(cluster)),
        })
    }

    /// The URL of `database` on this server (superuser `postgres`, trust authentication,
    /// through a unix socket only this process's user can reach: see
    /// [`postgres()`](super::postgres()) for who can connect).
    pub fn url(&self, database: &str) -> String {
        self.cluster.lock().url_of(database)
    }

    /// Restarts the server in place, as `pg_ctl restart -m fast` does: every connection is
    /// closed, in-flight transactions roll back, committed data stays (blocking).
    ///
    /// # Errors
    ///
    /// [`TestkitError::NoServer`] if the server does not stop or start again.
    pub fn restart(&self) -> Result<(), TestkitError> {
        local::restart(&mut self.cluster.lock()).map_err(|why| TestkitError::NoServer {
            tried: format!("  local restart: {why}"),
            image: super::DEFAULT_IMAGE.to_owned(),
        })
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if std::sync::Arc::strong_count(&self.cluster) == 1 {
            self.cluster.lock().stop();
        }
    }
}
