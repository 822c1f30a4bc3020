//! Transactional-outbox messaging on Postgres, and the toolkit to test it.
//!
//! You publish messages **inside your own database transaction**: they become visible, and
//! consumers are woken with `NOTIFY`, exactly when your business writes commit, and vanish if
//! they roll back. Consumers lease messages with `FOR UPDATE SKIP LOCKED`, settle them with
//! outcomes fenced by the lease, and retry failures through a policy that ends in a
//! dead-letter table, never in a silent delete.
//!
//! # Example
//!
//! The whole cycle on the in-memory [`FakeBroker`](fake::FakeBroker) (no server needed); the
//! same calls work on [`PgBackend`]:
//!
//! ```
//! # #[cfg(feature = "fake")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), postbox::Error> {
//! use postbox::prelude::*;
//! use postbox::{FetchParams, Message};
//! use postbox::fake::FakeBroker;
//!
//! let outbox = FakeBroker::new();
//! let mut tx = outbox.begin().await?;
//! outbox.publish(&mut tx, Message::new("emails", "receipt for order 42")).await?;
//! outbox.commit(tx).await?; // visible only now
//!
//! let deliveries = outbox.fetch(&FetchParams::new(["emails"], 16)).await?;
//! assert_eq!(deliveries.len(), 1);
//! assert!(outbox.ack(deliveries[0].lease()).await?); // fenced by the lease token
//! # Ok(()) }
//! # #[cfg(not(feature = "fake"))]
//! # fn main() {}
//! ```
//!
//! With Postgres, publish inside your own transaction:
//!
//! ```no_run
//! use postbox::prelude::*;
//! use postbox::{FetchParams, Message, PgBackend};
//!
//! # async fn run() -> Result<(), postbox::Error> {
//! let pool = postbox::sqlx::PgPool::connect("postgres://localhost/app").await?;
//! let outbox = PgBackend::new(pool.clone());
//! outbox.migrate().await?; // table `postbox`, its indexes and `postbox_dead`
//!
//! // Publish in the same transaction as your own writes.
//! let mut tx = pool.begin().await?;
//! // sqlx::query("INSERT INTO orders ...").execute(&mut *tx).await?;
//! outbox.publish(&mut tx, Message::json("emails", &serde_json::json!({"order": 42}))?).await?;
//! tx.commit().await?;
//!
//! // Consume: lease, handle (idempotently), ack.
//! for delivery in outbox.fetch(&FetchParams::new(["emails"], 16)).await? {
//!     let body: serde_json::Value = delivery.json()?;
//!     println!("sending {body}");
//!     outbox.ack(delivery.lease()).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Publishing
//!
//! [`PgBackend::publish`] and [`PgBackend::publish_batch`] run on your `&mut PgConnection` or
//! transaction and never begin, commit or roll back. A batch is one multi-row `INSERT` and one
//! `NOTIFY` per distinct queue. Messages carry an opaque payload, JSON-object headers, a
//! correlation id (generated when absent) and an optional delay.
//!
//! # Consuming
//!
//! [`Consume::fetch`] leases up to `limit` eligible rows under one fresh token, in
//! `(next_attempt_at, id)` order, reclaiming leases older than `lease_ttl`. Settle each
//! delivery with [`ack`](Consume::ack) / [`ack_batch`](Consume::ack_batch),
//! [`retry`](Consume::retry), [`dead_letter`](Consume::dead_letter), or let
//! [`fail`](Consume::fail) apply a [`RetryPolicy`].
//!
//! # Delivery guarantees
//!
//! - **At least once.** A message is deleted only when acked. A consumer that crashes leaves
//!   its lease to expire; the message is delivered again. **Handlers must be idempotent.**
//! - **Fenced outcomes.** Outcomes match the lease token: once a lease was lost, the old
//!   holder's ack, retry or dead-letter changes nothing and returns `Ok(false)`.
//! - **Nothing silently dropped.** Rejected messages, exhausted retries and crash loops
//!   (`max_deliveries`) move to the dead-letter table `T_dead` with a reason.
//!
//! # Testing
//!
//! With the `testkit` feature (as a dev-dependency), [`testkit::postgres()`](fn@testkit::postgres) gives every test a
//! fresh, migrated database cloned from a template: from `POSTBOX_TEST_DATABASE_URL`, a Docker
//! engine (testcontainers, with `testkit-docker`), or the Postgres binaries on the machine, and
//! [`#[postbox::test]`](macro@test) runs one test body on the fake and on Postgres.
//!
//! ```toml
//! [dependencies]
//! postbox = "0.1"
//!
//! [dev-dependencies]
//! postbox = { version = "0.1", features = ["testkit"] }
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `testkit` | [`testkit`] and [`#[postbox::test]`](macro@test): Postgres fixtures (a server URL or the local binaries), assertions, drain helpers, the adversary, the conformance suite (enables `fake`; 152 crates in the tree against 134 without) |
//! | `testkit-docker` | the testkit's Docker provider through testcontainers (250 crates) |
//! | `fake` | [`fake`]: the in-memory [`FakeBroker`](fake::FakeBroker) |
//! | `metrics` | [`metrics`]: counters, histograms and gauges through the `metrics` facade |
//! | `opentelemetry` | W3C trace context from the publishing span to the handler's |
//!
//! See the `examples/` directory for runnable programs, starting with `quickstart`.

// docs.rs builds with `--cfg docsrs`: mark what a feature or platform enables.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use postbox_core::*;

/// The in-memory backend [`FakeBroker`](fake::FakeBroker), with the semantics of Postgres.
///
/// **Feature:** `fake`.
#[cfg(feature = "fake")]
pub mod fake {
    #[doc(inline)]
    pub use postbox_fake::*;
}

/// Postgres fixtures for tests: [`postgres()`](fn@testkit::postgres) returns a fresh, migrated
/// database per call.
///
/// **Feature:** `testkit`.
#[cfg(feature = "testkit")]
pub mod testkit {
    #[doc(inline)]
    pub use postbox_testkit::*;
}

/// Runs one async test body on both backends: [`FakeBroker`](fake::FakeBroker) and a fresh
/// Postgres database.
///
/// Write the body once, generic over [`TestBackend`](testkit::TestBackend); the attribute
/// keeps the function and adds a module of the same name with one `#[test]` per backend, so
/// `cargo test order_is_published` runs `order_is_published::fake` and
/// `order_is_published::postgres`, and a failure names the backend it failed on.
///
/// ```
/// use postbox::testkit::{Expect, TestBackend, assert_published};
/// use postbox::prelude::*;
/// use postbox::Message;
///
/// #[postbox::test]
/// async fn order_is_published(outbox: impl TestBackend) -> Result<(), postbox::Error> {
///     let mut tx = outbox.begin().await?;
///     outbox.publish(&mut tx, Message::new("emails", "receipt 42")).await?;
///     outbox.commit(tx).await?;
///     assert_published(&outbox, Expect::queue("emails").payload("receipt 42")).await;
///     Ok(())
/// }
/// ```
///
/// - **The fake** runs on a current-thread runtime with paused time: retry delays and lease
///   expiry pass as soon as the test waits for them, and nothing sleeps.
/// - **Postgres** runs on a fixture from [`testkit::postgres()`](fn@testkit::postgres) (an
///   existing server, a container or the local binaries). When the test passes, the database
///   is dropped; when it fails (a panic, or an `Err` returned), it is kept, and its name and
///   URL are printed.
///
/// # The argument
///
/// One parameter, or none:
///
/// - the backend, by value or by reference: `outbox: impl TestBackend`, or a generic
///   `B: TestBackend`;
/// - a [`TestContext`](testkit::TestContext) (`ctx: TestContext<impl TestBackend>`), which
///   also gives the fixture's pool and database name on Postgres.
///
/// The body returns `()` or a `Result`; an `Err` fails the test.
///
/// # Options
///
/// | option | effect |
/// |---|---|
/// | `fake` / `postgres` | run on that backend only (default: both) |
/// | `table = "orders_outbox"` | the outbox table (migrated in the fixture) instead of `postbox` |
/// | `sql = "tests/schema.sql"` | run this file (relative to the crate's `Cargo.toml`, embedded at compile time) on the fixture first; repeat for several, they run in order |
/// | `setup = my_schema` | then call `async fn my_schema(pool: &PgPool) -> Result<(), E>` (or `-> ()`) |
/// | `crate = "path"` | where the facade is, if not `::postbox` |
///
/// The SQL files run before the outbox table is migrated, the set-up function after. A
/// failing step fails the test, names the step, and keeps the database. `#[ignore]` and
/// `#[should_panic]` apply to both generated tests.
///
/// ```
/// use postbox::testkit::{TestBackend, TestContext};
///
/// async fn seed(pool: &postbox::sqlx::PgPool) -> Result<(), postbox::sqlx::Error> {
///     postbox::sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)").execute(pool).await?;
///     Ok(())
/// }
///
/// #[postbox::test(postgres, table = "orders_outbox", setup = seed)]
/// async fn orders_table_exists(ctx: TestContext<impl TestBackend>) {
///     let pool = ctx.pool().expect("a Postgres run has a pool");
///     postbox::sqlx::query("SELECT count(*) FROM orders").execute(pool).await.unwrap();
/// }
/// ```
///
/// **Feature:** `testkit`.
#[cfg(feature = "testkit")]
pub use postbox_macros::test;

/// The README's code blocks, compiled (and run where they need no server) as doctests, so the
/// README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
