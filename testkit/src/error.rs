//! The testkit's error type.

/// What can go wrong while providing a test database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No provider could supply a Postgres server.
    #[error(
        "no Postgres server for tests. Tried:\n{tried}\nGet one in any of three ways:\n  \
         1. an existing server: set POSTBOX_TEST_DATABASE_URL (or DATABASE_URL) to a URL whose user may CREATE DATABASE;\n  \
         2. Docker: enable the testkit-docker feature of postbox and start a Docker engine (testcontainers runs {image}; set POSTBOX_TEST_PG_IMAGE=name:tag to choose the image);\n  \
         3. local binaries: install Postgres so that `initdb` and `postgres` are on PATH or under /usr/lib/postgresql/<version>/bin.\n\
         Set POSTBOX_TEST_PG=url|docker|local to force one."
    )]
    NoServer {
        /// One line per provider tried, with why it failed.
        tried: String,
        /// The Docker image that would be used.
        image: String,
    },

    /// `POSTBOX_TEST_PG` names no known provider.
    #[error("POSTBOX_TEST_PG={0:?} is not a provider; use url, docker or local")]
    UnknownProvider(String),

    /// A database statement of the fixture failed.
    #[error("test database setup failed: {0}")]
    Database(#[from] sqlx::Error),

    /// Migrating the template or a fixture's table failed.
    #[error("test database migration failed: {0}")]
    Migrate(#[from] postbox_core::Error),
}
