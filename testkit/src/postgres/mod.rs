//! `postgres()`: a fresh, migrated, isolated database per call.
//!
//! One server per test process, shared by URL only (each `#[tokio::test]` has its own runtime,
//! and sockets must not hop runtimes). On first use the testkit picks a provider (see
//! [`Provider`]), starts or connects to the server, and builds a template database with
//! postbox's migrations applied. Each fixture is then `CREATE DATABASE ... TEMPLATE`, which
//! takes tens of milliseconds instead of re-running migrations.

#[cfg(feature = "docker")]
mod docker;
mod fixture;
#[cfg(unix)]
mod local;
#[cfg(unix)]
mod private;
mod provider;
mod template;

use std::sync::OnceLock;

pub use fixture::PgFixture;
#[cfg(unix)]
pub use private::LocalServer;
pub use provider::{DEFAULT_IMAGE, Provider};

use crate::error::TestkitError;
use provider::Config;

/// The shared server of this test process.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) provider: Provider,
    /// Admin URL (a superuser, or a user that may CREATE DATABASE), database `postgres`
    /// or whatever the URL named.
    pub(crate) url: String,
    /// The template database fixtures are cloned from.
    pub(crate) template: String,
    /// Clone with `STRATEGY FILE_COPY`: on our own fsync-off servers of version 15 and later,
    /// where its checkpoint is cheap; it kept the tail lower than WAL_LOG (p95 52 vs 86 ms in
    /// one interleaved run here, p50 equal). Shared servers keep their default.
    pub(crate) file_copy: bool,
}

/// What must be stopped when the process exits.
enum Owned {
    #[cfg(unix)]
    Local(local::LocalCluster),
    #[cfg(feature = "docker")]
    Docker(docker::DockerServer),
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static OWNED: parking_lot::Mutex<Vec<Owned>> = parking_lot::Mutex::new(Vec::new());

/// Returns a fresh database, cloned from a template that has postbox's migrations applied
/// (default table `postbox`), on this process's shared test server.
///
/// The database is dropped when the fixture is dropped (or [`PgFixture::close`]d). If the
/// test panics, the database is kept for inspection and its name printed; a later run sweeps
/// it.
///
/// # Providers
///
/// Unless `POSTBOX_TEST_PG=url|docker|local` forces one, the first that works of:
///
/// 1. `url`: the server at `POSTBOX_TEST_DATABASE_URL`, else `DATABASE_URL` (its user must be
///    allowed to `CREATE DATABASE`);
/// 2. `docker` (feature `docker`, `testkit-docker` of the facade): a testcontainers Postgres
///    when a Docker engine answers; image [`DEFAULT_IMAGE`] unless
///    `POSTBOX_TEST_PG_IMAGE=name:tag`;
/// 3. `local`: a throwaway cluster from the local `initdb`/`postgres` binaries (on `PATH` or
///    under `/usr/lib/postgresql/<version>/bin`), in a temp dir, with `fsync=off`; run as the
///    `postgres` user when the tests run as root.
///
/// # Who else can connect
///
/// The servers the testkit starts are for the test process alone, even on a shared machine or
/// CI runner. The local cluster opens no TCP port: it listens on a unix socket inside its own
/// directory (mode 0700, owned by the user the server runs as), so another local user cannot
/// reach it. A container gets a random password, generated per test process, and publishes
/// its port on 127.0.0.1 only. Fixture URLs carry what is needed to connect (the socket
/// directory, or the password): do not print them where others can read them.
///
/// A started container or cluster is removed when the test process exits.
///
/// # Errors
///
/// [`TestkitError::NoServer`] listing what was tried and the three ways to get a server;
/// [`TestkitError::Database`] if creating the database fails.
///
/// # Examples
///
/// ```no_run
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// use postbox_core::prelude::*;
/// use postbox_core::{FetchParams, Message};
///
/// let db = postbox_testkit::postgres().await?;
/// let backend = db.backend();
/// let mut tx = backend.begin().await?;
/// backend.publish(&mut tx, Message::new("q", "hi")).await?;
/// backend.commit(tx).await?;
/// assert_eq!(backend.fetch(&FetchParams::new(["q"], 10)).await?.len(), 1);
/// # Ok(()) }
/// ```
///
/// # Cancel safety
///
/// Dropped after the database was created, it remains until a later run's sweep (shared server)
/// or the server's removal at exit (started cluster or container).
pub async fn postgres() -> Result<PgFixture, TestkitError> {
    let server =
        tokio::task::spawn_blocking(server)
            .await
            .map_err(|e| TestkitError::NoServer {
                tried: format!("  the provider thread panicked: {e}"),
                image: DEFAULT_IMAGE.into(),
            })??;
    PgFixture::create(server).await
}

/// The provider serving this process's fixtures, once one has started.
pub fn current_provider() -> Option<Provider> {
    SERVER
        .get()
        .and_then(|s| s.as_ref().ok())
        .map(|s| s.provider)
}

/// The shared server, started on first call.
fn server() -> Result<&'static Server, TestkitError> {
    let config = Config::from_vars(|k| std::env::var(k).ok())?;
    let image = config.image_ref();
    SERVER
        .get_or_init(|| start(&config))
        .as_ref()
        .map_err(|tried| TestkitError::NoServer {
            tried: tried.clone(),
            image,
        })
}

/// Tries the configured providers in order; on failure returns one line per provider.
fn start(config: &Config) -> Result<Server, String> {
    let mut tried = Vec::new();
    for provider in config.candidates() {
        match start_one(provider, config) {
            Ok(server) => {
                tracing::info!(target: "postbox", provider = %server.provider, "postbox.testkit: test server ready");
                return Ok(server);
            }
            Err(e) => {
                tracing::debug!(target: "postbox", %provider, error = %e, "postbox.testkit: provider unavailable");
                tried.push(format!("  - {provider}: {e}"));
            }
        }
    }
    Err(tried.join("\n"))
}

fn start_one(provider: Provider, config: &Config) -> Result<Server, String> {
    let url = match provider {
        Provider::Url => config.url.clone().ok_or_else(|| {
            "neither POSTBOX_TEST_DATABASE_URL nor DATABASE_URL is set".to_owned()
        })?,
        #[cfg(feature = "docker")]
        Provider::Docker => {
            let container = docker::start(&config.image)?;
            let url = container.url.clone();
            own(Owned::Docker(container));
            url
        }
        #[cfg(not(feature = "docker"))]
        Provider::Docker => {
            return Err(
                "not compiled in: enable the `docker` feature of postbox-testkit \
                        (`testkit-docker` of postbox)"
                    .to_owned(),
            );
        }
        #[cfg(unix)]
        Provider::Local => {
            let cluster = local::start()?;
            let url = cluster.url();
            own(Owned::Local(cluster));
            url
        }
        #[cfg(not(unix))]
        Provider::Local => {
            return Err("the local provider runs on Unix only".to_owned());
        }
    };
    let (template, version) = template::prepare(&url, provider == Provider::Url)?;
    Ok(Server {
        provider,
        url,
        template,
        file_copy: provider != Provider::Url && version >= 150_000,
    })
}

/// Records something to stop at exit, registering the exit hook once.
fn own(owned: Owned) {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        // SAFETY: registering a plain `extern "C"` function that does not unwind.
        unsafe {
            libc::atexit(stop_owned);
        }
    });
    OWNED.lock().push(owned);
}

/// Exit hook: statics are never dropped in Rust, so the process exit stops what we started.
extern "C" fn stop_owned() {
    let _ = std::panic::catch_unwind(|| {
        for owned in OWNED.lock().drain(..) {
            match owned {
                #[cfg(unix)]
                Owned::Local(cluster) => cluster.stop(),
                #[cfg(feature = "docker")]
                Owned::Docker(container) => container.stop(),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_an_unavailable_provider_gives_the_documented_error() {
        let config = Config {
            forced: Some(Provider::Url),
            url: None,
            image: ("postgres".into(), "17-alpine".into()),
        };
        let tried = start(&config).expect_err("no url configured");
        let err = TestkitError::NoServer {
            tried,
            image: config.image_ref(),
        };
        let text = err.to_string();
        for needle in [
            "url: neither POSTBOX_TEST_DATABASE_URL nor DATABASE_URL is set",
            "POSTBOX_TEST_DATABASE_URL",
            "Docker",
            "initdb",
            "POSTBOX_TEST_PG=url|docker|local",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
}
