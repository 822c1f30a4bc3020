//! An in-memory postbox backend with Postgres semantics, for tests.
//!
//! [`FakeBroker`] implements [`postbox_core::Backend`] in memory: the same eligibility,
//! `(next_attempt_at, id)` order, leases and fenced outcomes, retry accounting, dead letters
//! and `max_deliveries` as the Postgres backend, checked by the same conformance suite
//! (`postbox_testkit::conformance`). Its [`engine`](postbox_core::Consume::engine) is `None`,
//! so a subscriber on it polls and opens no connection.
//!
//! - Transactions: [`begin`](postbox_core::Publish::begin) → publish →
//!   [`commit`](postbox_core::Publish::commit); dropping a [`FakeTransaction`] rolls back.
//! - Time: tokio's clock (use `#[tokio::test(start_paused = true)]` and
//!   `tokio::time::advance`), plus [`FakeBroker::advance`].
//! - Faults: [`FakeBroker::fail_next_fetches`] and friends, with a [`Fault`].
//! - Inspection: [`FakeBroker::snapshot`], [`FakeBroker::dead`], [`FakeBroker::counters`].
//! - Dead-letter redrive: [`Redrive`](postbox_core::Redrive), as on Postgres.

mod broker;
mod clock;
mod coop;
mod depth;
mod faults;
mod journal;
mod publish;
mod redrive;
mod state;
mod topic_state;
mod topics;
mod tx;

pub use broker::FakeBroker;
pub use faults::Fault;
pub use state::FakeCounters;
pub use tx::{FakeConn, FakeTransaction};
