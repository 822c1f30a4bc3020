//! Test tools for postbox.
//!
//! - [`postgres()`](fn@postgres): a fresh, migrated, isolated Postgres database per test, from
//!   an existing server, a testcontainers container or the local Postgres binaries.
//! - [`assert_published`], [`assert_not_published`], [`assert_published_many`],
//!   [`published`]: what was published, on any backend, with an [`Expect`];
//!   [`assert_published_in`] inside an open transaction, [`assert_published_as`] returning the
//!   decoded payload, [`wait_published`] for what spawned work publishes.
//! - `#[postbox::test]` (through the facade) runs one body on both backends, with a
//!   [`TestBackend`] or a [`TestContext`].
//! - [`run_one`] and [`drain`]: run a handler on one or all ready messages, step by step.
//! - [`TimeControl`]: move a backend's clock (the fake's, or the one Postgres statements read).
//! - [`wait_for_event`]: wait on a subscriber event with one deadline instead of sleeping.
//! - [`adversary`]: does your handler end in the same state under duplicates, crashes before
//!   the ack, concurrent redelivery and retries as when each message is delivered once?
//! - [`props`]: proptest schedules, a reference model and the invariants, to run on any
//!   backend (model vs fake, model vs Postgres, fake vs Postgres).
//! - [`conformance`]: the behavioural suite every backend passes, and
//!   [`conformance_tests!`] to run it.
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

// docs.rs builds with `--cfg docsrs`: mark what a feature or platform enables.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod adversary;
mod assert;
pub mod conformance;
mod context;
mod drain;
mod error;
mod live;
mod postgres;
pub mod props;
mod runner;
mod time;
mod wait;

pub use assert::{
    AssertError, Expect, assert_not_published, assert_not_published_in, assert_published,
    assert_published_as, assert_published_in, assert_published_many, published,
    try_assert_not_published, try_assert_published, try_assert_published_as,
    try_assert_published_in, try_assert_published_many, try_wait_published_within, wait_published,
    wait_published_within,
};
pub use context::{TestBackend, TestContext};
pub use drain::{DrainOptions, DrainReport, drain, run_one};
pub use error::TestkitError;
pub use live::JournalLiveControl;
#[cfg(unix)]
pub use postgres::LocalServer;
pub use postgres::{DEFAULT_IMAGE, PgFixture, Provider, current_provider, postgres};
pub use time::TimeControl;
pub use wait::{deadline, until_within, wait_for_event, wait_for_event_within, within};

/// What `#[postbox::test]` expands to calls; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::runner::{
        PgSetup, SetupOutcome, TestOutcome, pg_pool, run_fake, run_postgres, setup_done,
    };
}
