//! What `#[postbox::test]` expands to calls: a runtime per test, the backend, and what
//! happens to the database when the test fails. Not a stable API.

use std::fmt::Debug;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use postbox_core::PgBackend;
use postbox_fake::FakeBroker;
use sqlx::PgPool;

use crate::context::TestContext;
use crate::postgres::{PgFixture, Provider};

/// How a test body ended: `()` passes, a `Result` fails with `Err`.
pub trait TestOutcome {
    /// Whether the test failed.
    fn is_failure(&self) -> bool;
}

impl TestOutcome for () {
    fn is_failure(&self) -> bool {
        false
    }
}

impl<T, E> TestOutcome for Result<T, E> {
    fn is_failure(&self) -> bool {
        self.is_err()
    }
}

/// What a `setup = ..` function may return: `()` or a `Result` whose error is printed.
pub trait SetupOutcome {
    /// Panics, naming `setup`, if the set-up failed.
    fn check(self, setup: &str);
}

impl SetupOutcome for () {
    fn check(self, _: &str) {}
}

impl<T, E: Debug> SetupOutcome for Result<T, E> {
    fn check(self, setup: &str) {
        if let Err(e) = self {
            panic!("set-up `{setup}` failed: {e:?}");
        }
    }
}

/// Panics, naming `setup`, if it failed.
pub fn setup_done(setup: &str, outcome: impl SetupOutcome) {
    outcome.check(setup);
}

/// The fixture's pool, for a `setup = ..` function.
pub fn pg_pool(ctx: &TestContext<PgBackend>) -> &PgPool {
    ctx.pg_pool()
}

/// How the Postgres run prepares its database.
#[derive(Debug, Clone, Copy)]
pub struct PgSetup {
    /// The outbox table, when not `postbox`.
    pub table: Option<&'static str>,
    /// SQL files (path, contents) run in order before the outbox table is migrated.
    pub sql: &'static [(&'static str, &'static str)],
    /// The test is `#[should_panic]`: a panic passes it, so its database is dropped.
    pub expect_panic: bool,
}

/// Runs `body` on a new [`FakeBroker`], on a current-thread runtime with paused time (delays
/// and lease expiry pass as soon as the test waits for them).
///
/// # Panics
///
/// If the test panics (after saying it failed on the fake), or if no runtime can be built.
pub fn run_fake<R, F, Fut>(test: &str, body: F) -> R
where
    R: TestOutcome,
    F: FnOnce(TestContext<FakeBroker>) -> Fut,
    Fut: Future<Output = R>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("{test}: could not build a tokio runtime: {e}"));
    match catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async { body(TestContext::fake()).await })
    })) {
        Ok(outcome) => {
            if outcome.is_failure() {
                eprintln!("postbox::test {test}: failed on the fake backend (FakeBroker)");
            }
            outcome
        }
        Err(panic) => {
            eprintln!("postbox::test {test}: panicked on the fake backend (FakeBroker)");
            resume_unwind(panic)
        }
    }
}

/// Runs `body` on a fresh fixture database (from [`postgres()`](crate::postgres())), prepared
/// by `setup`, on a current-thread runtime. The database is dropped when the test passes and
/// kept, with its name and URL printed, when it fails (an `Err` or a panic).
///
/// # Panics
///
/// If no Postgres server is available, a set-up step fails or the test panics (each message
/// says which, and where the database was kept).
pub fn run_postgres<R, F, Fut>(test: &str, setup: PgSetup, body: F) -> R
where
    R: TestOutcome,
    F: FnOnce(TestContext<PgBackend>) -> Fut,
    Fut: Future<Output = R>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{test}: could not build a tokio runtime: {e}"));
    let fixture = runtime
        .block_on(crate::postgres())
        .unwrap_or_else(|e| panic!("postbox::test {test}: the Postgres run needs a server: {e}"));
    let prepared = catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(prepare(test, &fixture, setup))
    }));
    let ctx = match prepared {
        Ok(ctx) => ctx,
        Err(panic) => {
            keep(test, fixture, "its set-up failed");
            resume_unwind(panic)
        }
    };
    match catch_unwind(AssertUnwindSafe(|| runtime.block_on(body(ctx)))) {
        Ok(outcome) if outcome.is_failure() => {
            keep(test, fixture, "it returned an error");
            outcome
        }
        Ok(outcome) => {
            if let Err(e) = runtime.block_on(fixture.close()) {
                eprintln!("postbox::test {test}: could not drop its database: {e}");
            }
            outcome
        }
        Err(panic) if setup.expect_panic => {
            if let Err(e) = runtime.block_on(fixture.close()) {
                eprintln!("postbox::test {test}: could not drop its database: {e}");
            }
            resume_unwind(panic)
        }
        Err(panic) => {
            keep(test, fixture, "it panicked");
            resume_unwind(panic)
        }
    }
}

async fn prepare(test: &str, fixture: &PgFixture, setup: PgSetup) -> TestContext<PgBackend> {
    for (path, sql) in setup.sql {
        if let Err(e) = sqlx::raw_sql(*sql).execute(fixture.pool()).await {
            panic!("postbox::test {test}: running {path} failed: {e}");
        }
    }
    let backend = match setup.table {
        None => fixture.backend(),
        Some(table) => fixture.backend_for(table).await.unwrap_or_else(|e| {
            panic!("postbox::test {test}: preparing the outbox table {table:?} failed: {e}")
        }),
    };
    TestContext::postgres(
        backend,
        fixture.pool().clone(),
        fixture.database().to_owned(),
    )
}

fn keep(test: &str, fixture: PgFixture, why: &str) {
    let lasts = if fixture.provider() == Provider::Url {
        ""
    } else {
        " (the server this process started goes when it exits: set \
         POSTBOX_TEST_DATABASE_URL to keep it longer)"
    };
    let (database, url) = fixture.keep();
    eprintln!(
        "postbox::test {test}: failed on postgres ({why}); database {database} kept for \
         inspection{lasts}: {url}"
    );
}
