//! An at-least-once adversary for your handlers: does the handler end in the same state when
//! messages are delivered twice, concurrently, after crashes and after retries, as when each
//! is delivered exactly once?
//!
//! Postbox delivers at least once, so every handler must be idempotent. This module checks
//! it. Give it a [`World`] (a fresh backend, your handler, and a function that reads the
//! state your handler changes) and the messages to publish. For each [`Schedule`] of
//! [`Fault`]s it builds two worlds:
//!
//! 1. **once**: every message delivered exactly once and acked, in order;
//! 2. **attacked**: the first deliveries suffer the schedule's faults (a crash after the side
//!    effect but before the ack, a retry after the side effect, a lease that expires while
//!    the handler runs so two consumers handle the message at once, a crash before handling),
//!    then the rest are delivered normally until every message is settled.
//!
//! It then compares what `observe` returns. Any difference is a [`AdversaryError::NotIdempotent`]
//! whose message lists what happened, step by step.
//!
//! Failed handlers are settled as the subscriber settles them (the [`RetryPolicy`], then the
//! dead-letter table), and the clock moves instead of anyone sleeping: leases expire and
//! retries come due at once. Retries reorder deliveries, as they do in production: a handler
//! whose final state depends on the order of its messages fails here too.
//!
//! # With proptest
//!
//! [`Adversary::check`] runs random schedules through proptest and reports the shrunk,
//! minimal one; [`schedules`] and [`check_schedule`] let you drive it from your own
//! `proptest!` block instead.
//!
//! ```
//! use std::collections::HashSet;
//! use std::sync::Arc;
//! use parking_lot::Mutex;
//! use postbox_core::{Delivery, HandlerError, Message};
//! use postbox_fake::FakeBroker;
//! use postbox_testkit::adversary::{Adversary, World};
//!
//! #[derive(Default)]
//! struct Ledger { balance: i64, applied: HashSet<postbox_core::MessageId> }
//!
//! // Idempotent: each message id is applied once, in the same critical section as the effect.
//! fn world() -> World<FakeBroker, impl postbox_core::Handler, i64> {
//!     let ledger = Arc::new(Mutex::new(Ledger::default()));
//!     let handler_ledger = ledger.clone();
//!     let handler = move |d: Delivery| {
//!         let ledger = handler_ledger.clone();
//!         async move {
//!             let amount: i64 = d.json().map_err(HandlerError::reject)?;
//!             let mut ledger = ledger.lock();
//!             if ledger.applied.insert(d.id) {
//!                 ledger.balance += amount;
//!             }
//!             Ok::<(), HandlerError>(())
//!         }
//!     };
//!     World::new(FakeBroker::new(), handler, move || {
//!         let ledger = ledger.clone();
//!         async move { ledger.lock().balance }
//!     })
//! }
//!
//! let deposits = [10, 20, 30].map(|n| Message::json("deposits", &n).unwrap()).to_vec();
//! Adversary::new(deposits).cases(32).check(|| async { world() })?;
//! # Ok::<(), postbox_testkit::adversary::AdversaryError>(())
//! ```
//!
//! On Postgres, build each world on its own fixture and keep the fixture with
//! [`World::holding`]. `examples/idempotent_handler.rs` catches a naive handler and passes the
//! fixed one.

mod run;
mod schedule;
mod world;

use std::fmt;

use postbox_core::{Message, RetryPolicy};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use run::Run;

pub use schedule::{Fault, Schedule, fault, schedules};
pub use world::{MakeWorld, World};

/// Why a check failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AdversaryError {
    /// The attacked world ended in another state than the one delivered each message once.
    NotIdempotent {
        /// The schedule that broke the handler (after shrinking, with [`Adversary::check`]).
        schedule: Schedule,
        /// What happened in the attacked world, one line per delivery.
        steps: Vec<String>,
        /// The state after delivering each message once (`Debug`).
        once: String,
        /// The state after the schedule (`Debug`).
        attacked: String,
    },
    /// A run delivered more than 64 times per message without settling them all: a handler
    /// that never succeeds under a policy that never gives up.
    Stuck {
        /// Deliveries made.
        deliveries: usize,
        /// What happened, one line per delivery.
        steps: Vec<String>,
    },
    /// The backend failed.
    Backend(postbox_core::Error),
    /// The check could not run (it was called inside a tokio runtime, or a runtime could not
    /// be built), or proptest gave up.
    Setup(String),
}

impl From<postbox_core::Error> for AdversaryError {
    fn from(e: postbox_core::Error) -> Self {
        AdversaryError::Backend(e)
    }
}

impl fmt::Display for AdversaryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdversaryError::NotIdempotent {
                schedule,
                steps,
                once,
                attacked,
            } => {
                writeln!(
                    f,
                    "the handler is not idempotent: delivered at least once, it ends in another \
                     state than delivered exactly once"
                )?;
                writeln!(f, "schedule: {schedule}")?;
                writeln!(f, "what happened:")?;
                for (i, step) in steps.iter().enumerate() {
                    writeln!(f, "  {:>2}. {step}", i + 1)?;
                }
                writeln!(f, "state after delivering each message once: {once}")?;
                write!(f, "state after this schedule:                {attacked}")
            }
            AdversaryError::Stuck { deliveries, steps } => {
                writeln!(
                    f,
                    "the messages were not all settled after {deliveries} deliveries (does the \
                     handler ever succeed, and does the retry policy ever give up?)"
                )?;
                for (i, step) in steps.iter().enumerate().rev().take(10).rev() {
                    writeln!(f, "  {:>2}. {step}", i + 1)?;
                }
                Ok(())
            }
            AdversaryError::Backend(e) => write!(f, "the backend failed: {e}"),
            AdversaryError::Setup(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for AdversaryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdversaryError::Backend(e) => Some(e),
            _ => None,
        }
    }
}

/// Runs `messages` once on a world from `make_world` delivered exactly once, and once under
/// `schedule` on another, and compares the states. For your own `proptest!` block, with
/// [`schedules`]; the handler's failures go through `RetryPolicy::default()`.
///
/// # Errors
///
/// [`AdversaryError::NotIdempotent`] with the steps, [`AdversaryError::Stuck`] or
/// [`AdversaryError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: each call builds its own worlds; a dropped check leaves them to be dropped.
pub async fn check_schedule(
    make_world: impl MakeWorld,
    messages: &[Message],
    schedule: &Schedule,
) -> Result<(), AdversaryError> {
    check_with(&make_world, messages, schedule, &RetryPolicy::default()).await
}

async fn check_with(
    make_world: &impl MakeWorld,
    messages: &[Message],
    schedule: &Schedule,
    policy: &RetryPolicy,
) -> Result<(), AdversaryError> {
    let world = make_world.make().await;
    let mut once = Run::start(&world, messages, policy.clone()).await?;
    once.play(&Schedule::default()).await?;
    let expected = once.observe().await;
    drop(once);
    drop(world);

    let world = make_world.make().await;
    let mut attacked = Run::start(&world, messages, policy.clone()).await?;
    attacked.play(schedule).await?;
    let actual = attacked.observe().await;
    if actual == expected {
        Ok(())
    } else {
        Err(AdversaryError::NotIdempotent {
            schedule: schedule.clone(),
            steps: std::mem::take(&mut attacked.log),
            once: format!("{expected:?}"),
            attacked: format!("{actual:?}"),
        })
    }
}

/// Random schedules against a handler, through proptest, with the minimal failing one
/// reported.
#[derive(Debug, Clone)]
pub struct Adversary {
    messages: Vec<Message>,
    cases: u32,
    max_faults: usize,
    policy: RetryPolicy,
}

impl Adversary {
    /// An adversary publishing `messages` (in one transaction) in every run. Defaults: 64
    /// cases, up to twice as many faults as messages, `RetryPolicy::default()`.
    pub fn new(messages: Vec<Message>) -> Self {
        let max_faults = (messages.len() * 2).max(2);
        Adversary {
            messages,
            cases: 64,
            max_faults,
            policy: RetryPolicy::default(),
        }
    }

    /// How many random schedules to try (each builds two worlds).
    #[must_use]
    pub fn cases(mut self, cases: u32) -> Self {
        self.cases = cases;
        self
    }

    /// The most faults in one schedule.
    #[must_use]
    pub fn max_faults(mut self, max_faults: usize) -> Self {
        self.max_faults = max_faults;
        self
    }

    /// The policy applied when the handler fails, as your subscriber's.
    #[must_use]
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Tries random schedules on worlds from `make_world`, on a runtime of its own; on
    /// failure, proptest shrinks the schedule to the fewest faults that still break the
    /// handler and the error describes that run.
    ///
    /// Call it from a plain `#[test]`: it builds its own tokio runtime, so inside an async
    /// test use [`check_schedule`] with [`schedules`] instead.
    ///
    /// # Errors
    ///
    /// [`AdversaryError::NotIdempotent`] for the minimal schedule, [`AdversaryError::Stuck`],
    /// [`AdversaryError::Backend`], or [`AdversaryError::Setup`] when called inside a runtime.
    pub fn check(&self, make_world: impl MakeWorld) -> Result<(), AdversaryError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(AdversaryError::Setup(
                "Adversary::check builds its own runtime: call it from a plain #[test], or use \
                 check_schedule with the schedules() strategy inside an async test"
                    .into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AdversaryError::Setup(format!("could not build a tokio runtime: {e}")))?;
        let config = Config {
            cases: self.cases,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        // proptest reports failures as text; the last one seen is the minimal schedule's.
        let last = parking_lot::Mutex::new(None);
        let result = runner.run(&schedules(self.max_faults), |schedule| {
            match runtime.block_on(check_with(
                &make_world,
                &self.messages,
                &schedule,
                &self.policy,
            )) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let reason = e.to_string();
                    *last.lock() = Some(e);
                    Err(TestCaseError::fail(reason))
                }
            }
        });
        match result {
            Ok(()) => Ok(()),
            Err(TestError::Fail(reason, schedule)) => {
                // Re-run the minimal schedule so the error is that run's, not the last tried.
                match runtime.block_on(check_with(
                    &make_world,
                    &self.messages,
                    &schedule,
                    &self.policy,
                )) {
                    Err(e) => Err(e),
                    Ok(()) => Err(last
                        .into_inner()
                        .unwrap_or_else(|| AdversaryError::Setup(reason.to_string()))),
                }
            }
            Err(TestError::Abort(reason)) => {
                Err(AdversaryError::Setup(format!("proptest gave up: {reason}")))
            }
        }
    }

    /// [`check`](Self::check), panicking with the failing run described step by step.
    ///
    /// # Panics
    ///
    /// When the check fails.
    pub fn assert(&self, make_world: impl MakeWorld) {
        if let Err(e) = self.check(make_world) {
            panic!("{e}");
        }
    }
}
