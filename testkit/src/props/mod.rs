//! Property testing: random schedules over several queues, plain consumers and cooperative
//! members, and topics with their subscriptions; a reference model that predicts every step,
//! and the invariants every backend must keep.
//!
//! - [`schedules`] / [`op`]: proptest strategies for [`Schedule`]s of [`Op`]s (publish with
//!   commit or rollback and delays, fetch, receive, ack, ack_batch, retry, dead-letter,
//!   release, renew, touch, crash, unregister, advance time; and subscribe, unsubscribe,
//!   publish to a topic with idempotency keys, receive from a subscription, settle one topic
//!   lease or a whole receive).
//! - [`run`]: runs a schedule on an [`Exec`] — the [`Model`] or a [`BackendExec`] over any
//!   backend with a [`TimeControl`](crate::TimeControl) clock — and drains it, giving a
//!   [`Trace`] of what each step returned and what was stored after it.
//! - [`Trace::compare`]: the first step where two runs differ (model vs fake, model vs
//!   Postgres, fake vs Postgres).
//! - [`check`]: the invariants (no duplicate delivery to live holders, fenced stale writes,
//!   no loss, no delivery of rolled-back publishes, fetch order, attempt accounting).
//!
//! Time: Postgres' `test-util` clock (every statement reads `coalesce($now, now())`) is
//! pinned at the start and moved only by `Advance` steps; run the fake on a paused tokio
//! runtime (`start_paused(true)`) for the same effect. A schedule never waits for real time,
//! and both backends see identical timestamps. (The alternatives — short real intervals, or
//! rewriting lease timestamps with SQL — would make cases slow or test a different statement
//! path than production uses.)
//!
//! ```
//! use postbox_testkit::props::{self, BackendExec, Model};
//! use proptest::test_runner::{Config, TestCaseError, TestRunner};
//!
//! // The fake runs on tokio's clock: paused, only `Advance` steps move it.
//! let rt = tokio::runtime::Builder::new_current_thread()
//!     .enable_all()
//!     .start_paused(true)
//!     .build()?;
//! let mut runner = TestRunner::new(Config::with_cases(16));
//! runner.run(&props::any_schedule(), |schedule| {
//!     rt.block_on(async {
//!         let expected = props::run(&mut Model::new(schedule.config.clone()), &schedule).await?;
//!         let fake = postbox_fake::FakeBroker::new();
//!         let mut exec = BackendExec::new(fake, schedule.config.clone()).await?;
//!         let actual = props::run(&mut exec, &schedule).await?;
//!         props::check(&schedule.config, &actual)?;
//!         expected.compare(&actual, ("model", "fake"))
//!     })
//!     .map_err(TestCaseError::fail)
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod check;
mod exec;
mod model;
mod schedule;
mod topic_check;
mod topic_model;
mod trace;

pub use check::check;
pub use exec::{BackendExec, Exec, run};
pub use model::Model;
pub use schedule::{
    KEYS, MAX_DELAY_S, Op, Schedule, ScheduleConfig, any_schedule, configs, op, schedules,
};
pub use trace::{
    Dead, Label, Live, LiveState, OutcomeKind, Row, Seen, Snapshot, Step, SubState, Trace,
};

/// The consumer group every schedule's members belong to.
pub const GROUP: &str = "g";
