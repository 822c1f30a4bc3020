//! Test fixtures for postbox.
//!
//! - [`postgres()`](fn@postgres): a fresh, migrated, isolated Postgres database per test, from an existing
//!   server, a testcontainers container or the local Postgres binaries, whichever is available.
//!
//! Add it as a dev-dependency (through the facade: `postbox = { features = ["testkit"] }`).
//!
//! ```no_run
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! let db = postbox_testkit::postgres().await?;
//! let backend = db.backend(); // table `postbox`, migrated
//! # let _ = backend;
//! db.close().await?;
//! # Ok(()) }
//! ```

mod error;
pub mod postgres;

pub use error::TestkitError;
pub use postgres::{PgFixture, Provider, postgres};
