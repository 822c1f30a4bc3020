//! Property tests (SPEC section 10): random schedules over several queues, plain consumers
//! and cooperative members, topics with subscriptions and idempotency keys, run on the
//! reference model, the fake and Postgres.
//!
//! - `model_vs_fake`: many cases, in memory.
//! - `model_vs_postgres`: fewer cases, each on a fresh fixture database.
//! - `fake_vs_postgres`: the differential test: the same schedule on both backends gives the
//!   same trace, step by step (results and stored state), without consulting the model.
//!
//! Every run is also checked against the invariants (`props::check`). Time never passes by
//! itself: the fake's clock and Postgres' `test-util` clock are pinned and moved by the
//! schedule's `advance` steps. Failing cases are shrunk to a minimal schedule, printed one
//! operation per line, and their seeds saved in `tests/props.proptest-regressions`
//! (committed). `POSTBOX_PROP_CASES=N` overrides every case count here (e.g. 5000 for a soak).

use postbox::fake::FakeBroker;
use postbox::testkit::props::{self, BackendExec, Model, Schedule, Trace};
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The fake runs on tokio's clock: paused, it moves only when a schedule advances it.
fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime")
}

fn cases(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("POSTBOX_PROP_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
        // Shrinking a Postgres case costs a fixture per step: bound it.
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    }
}

async fn model(schedule: &Schedule) -> Result<Trace, String> {
    props::run(&mut Model::new(schedule.config.clone()), schedule).await
}

async fn fake(schedule: &Schedule) -> Result<Trace, String> {
    let mut exec = BackendExec::new(FakeBroker::new(), schedule.config.clone()).await?;
    let trace = props::run(&mut exec, schedule).await?;
    props::check(&schedule.config, &trace).map_err(|e| format!("fake: {e}"))?;
    Ok(trace)
}

async fn postgres(schedule: &Schedule) -> Result<Trace, String> {
    let db = postbox::testkit::postgres()
        .await
        .map_err(|e| e.to_string())?;
    let mut exec = BackendExec::new(db.backend(), schedule.config.clone()).await?;
    let trace = props::run(&mut exec, schedule).await;
    drop(exec);
    db.close().await.map_err(|e| e.to_string())?;
    let trace = trace?;
    props::check(&schedule.config, &trace).map_err(|e| format!("postgres: {e}"))?;
    Ok(trace)
}

proptest! {
    #![proptest_config(cases(512))]
    #[test]
    fn model_vs_fake(schedule in props::any_schedule()) {
        paused().block_on(async {
            let expected = model(&schedule).await?;
            let actual = fake(&schedule).await?;
            expected.compare(&actual, ("model", "fake"))
        }).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(cases(32))]
    #[test]
    fn model_vs_postgres(schedule in props::any_schedule()) {
        runtime().block_on(async {
            let expected = model(&schedule).await?;
            let actual = postgres(&schedule).await?;
            expected.compare(&actual, ("model", "postgres"))
        }).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn fake_vs_postgres(schedule in props::any_schedule()) {
        // Separate runtimes: the fake's paused clock must not jump while Postgres I/O waits.
        let on_fake = paused().block_on(fake(&schedule)).map_err(TestCaseError::fail)?;
        let on_postgres = runtime().block_on(postgres(&schedule)).map_err(TestCaseError::fail)?;
        on_fake.compare(&on_postgres, ("fake", "postgres")).map_err(TestCaseError::fail)?;
    }
}

/// The model itself keeps the invariants (a model bug would otherwise hide behind
/// agreement), and the generated schedules reach every interesting situation: without that,
/// the agreement tests above could pass vacuously.
#[test]
fn model_keeps_the_invariants_and_schedules_cover_every_case() {
    use postbox::testkit::props::{OutcomeKind, Seen};
    use std::collections::BTreeMap;

    let coverage = std::cell::RefCell::new(BTreeMap::<&str, u32>::new());
    let mut runner = proptest::test_runner::TestRunner::new(cases(1024));
    runner
        .run(&props::any_schedule(), |schedule| {
            let trace = runtime()
                .block_on(async {
                    let trace = model(&schedule).await?;
                    props::check(&schedule.config, &trace)?;
                    Ok::<_, String>(trace)
                })
                .map_err(TestCaseError::fail)?;
            let mut seen = coverage.borrow_mut();
            for step in &trace.steps {
                let what = match &step.seen {
                    Seen::Published {
                        committed: false, ..
                    } => "rolled back publish",
                    Seen::Delivered { by: None, rows, .. }
                        if rows.iter().any(|r| r.deliveries > 1) =>
                    {
                        "fetch re-delivered a row"
                    }
                    Seen::Delivered {
                        by: Some(_), rows, ..
                    } if rows.iter().any(|r| r.deliveries > 1) => "receive re-delivered a row",
                    Seen::Outcome { done: false, .. } => "stale write refused",
                    Seen::Outcome {
                        kind: OutcomeKind::Retry,
                        done: true,
                        ..
                    } => "retry",
                    Seen::Outcome {
                        kind: OutcomeKind::Release,
                        done: true,
                        ..
                    } => "release",
                    Seen::Unregistered { result: Err(_), .. } => "unregister refused",
                    Seen::Unregistered {
                        result: Ok(true),
                        requeue: true,
                        ..
                    } => "requeued",
                    Seen::TopicPublished {
                        labels,
                        resolved,
                        committed: true,
                        ..
                    } if labels != resolved => "keyed duplicate",
                    Seen::TopicPublished {
                        committed: false, ..
                    } => "rolled back topic publish",
                    Seen::Received { rows, .. } if rows.iter().any(|r| r.deliveries > 1) => {
                        "topic re-delivered a message"
                    }
                    Seen::Received { known: false, .. } => "receive from an unknown subscription",
                    Seen::TopicSettled { done: false, .. } => "stale topic settle refused",
                    Seen::TopicSettled {
                        kind: OutcomeKind::Retry,
                        done: true,
                        ..
                    } => "topic retry",
                    Seen::TopicSettled {
                        kind: OutcomeKind::Release,
                        done: true,
                        ..
                    } => "topic release",
                    Seen::TopicSettled {
                        kind: OutcomeKind::Renew,
                        done: true,
                        ..
                    } => "topic renew",
                    Seen::Unsubscribed { result: Err(_), .. } => "unsubscribe refused",
                    Seen::Unsubscribed {
                        result: Ok(true),
                        discard: true,
                        ..
                    } => "unsubscribe discarding",
                    _ => continue,
                };
                *seen.entry(what).or_default() += 1;
            }
            let last = trace.steps.last().map(|s| &s.after);
            if last.is_some_and(|s| !s.dead.is_empty()) {
                *seen.entry("dead letters").or_default() += 1;
            }
            if last.is_some_and(|s| s.subs.iter().any(|s| !s.dead.is_empty())) {
                *seen.entry("subscription dead letters").or_default() += 1;
            }
            // Fan-out: one message received by two subscriptions in the run.
            let mut receivers = BTreeMap::<u32, std::collections::BTreeSet<u8>>::new();
            for step in &trace.steps {
                if let Seen::Received { sub, rows, .. } = &step.seen {
                    for r in rows {
                        receivers.entry(r.label).or_default().insert(*sub);
                    }
                }
            }
            if receivers.values().any(|subs| subs.len() > 1) {
                *seen.entry("fan-out to two subscriptions").or_default() += 1;
            }
            Ok(())
        })
        .expect("model invariants");
    let coverage = coverage.into_inner();
    eprintln!("schedule coverage over 1024 cases: {coverage:?}");
    for what in [
        "rolled back publish",
        "fetch re-delivered a row",
        "receive re-delivered a row",
        "stale write refused",
        "retry",
        "release",
        "unregister refused",
        "requeued",
        "dead letters",
        "keyed duplicate",
        "rolled back topic publish",
        "topic re-delivered a message",
        "receive from an unknown subscription",
        "stale topic settle refused",
        "topic retry",
        "topic release",
        "topic renew",
        "unsubscribe refused",
        "unsubscribe discarding",
        "subscription dead letters",
        "fan-out to two subscriptions",
    ] {
        assert!(
            coverage.get(what).copied().unwrap_or(0) > 0,
            "no schedule covered: {what}"
        );
    }
}
