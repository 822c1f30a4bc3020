//! The at-least-once adversary (`postbox::testkit::adversary`): it catches handlers that are
//! not idempotent, passes those that are, on the fake and on Postgres.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::fake::FakeBroker;
use postbox::testkit::adversary::{
    Adversary, AdversaryError, Fault, Schedule, World, check_schedule,
};
use postbox::{Delivery, Handler, HandlerError, Message, MessageId, PgBackend, RetryPolicy};

fn deposits() -> Vec<Message> {
    [10, 20, 30]
        .map(|amount| Message::json("deposits", &amount).expect("json"))
        .to_vec()
}

#[derive(Default)]
struct Ledger {
    balance: i64,
    applied: HashSet<MessageId>,
}

/// Adds every delivery it sees: a redelivery counts twice.
fn naive(ledger: Arc<Mutex<Ledger>>) -> impl Handler {
    move |d: Delivery| {
        let ledger = ledger.clone();
        async move {
            let amount: i64 = d.json().map_err(HandlerError::reject)?;
            ledger.lock().balance += amount;
            Ok(())
        }
    }
}

/// Applies each message id once, checked and recorded with the effect.
fn idempotent(ledger: Arc<Mutex<Ledger>>) -> impl Handler {
    move |d: Delivery| {
        let ledger = ledger.clone();
        async move {
            let amount: i64 = d.json().map_err(HandlerError::reject)?;
            let mut ledger = ledger.lock();
            if ledger.applied.insert(d.id) {
                ledger.balance += amount;
            }
            Ok(())
        }
    }
}

/// Checks, then awaits (a call elsewhere), then records: idempotent one delivery at a time,
/// not when two consumers handle the message at once.
fn check_then_act(ledger: Arc<Mutex<Ledger>>) -> impl Handler {
    move |d: Delivery| {
        let ledger = ledger.clone();
        async move {
            let amount: i64 = d.json().map_err(HandlerError::reject)?;
            if ledger.lock().applied.contains(&d.id) {
                return Ok(());
            }
            tokio::task::yield_now().await;
            let mut ledger = ledger.lock();
            ledger.applied.insert(d.id);
            ledger.balance += amount;
            Ok(())
        }
    }
}

fn fake_world<H: Handler>(handler: impl Fn(Arc<Mutex<Ledger>>) -> H) -> World<FakeBroker, H, i64> {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let observed = ledger.clone();
    World::new(FakeBroker::new(), handler(ledger), move || {
        let ledger = observed.clone();
        async move { ledger.lock().balance }
    })
}

#[test]
fn a_naive_handler_is_caught_with_a_minimal_schedule() {
    let error = Adversary::new(deposits())
        .cases(64)
        .check(|| async { fake_world(naive) })
        .expect_err("adding every delivery is not idempotent");
    let AdversaryError::NotIdempotent {
        schedule,
        steps,
        once,
        attacked,
    } = &error
    else {
        panic!("expected NotIdempotent, got {error}");
    };
    assert_eq!(once, "60");
    assert_ne!(attacked, "60");
    let faults: Vec<&Fault> = schedule
        .faults
        .iter()
        .filter(|f| **f != Fault::Deliver)
        .collect();
    assert_eq!(faults.len(), 1, "shrunk to one fault: {schedule}");
    assert_ne!(
        *faults[0],
        Fault::CrashBeforeHandle,
        "that fault has no side effect"
    );
    let text = error.to_string();
    assert!(text.contains("what happened:"), "{text}");
    assert!(
        text.contains("delivery 2"),
        "the redelivery is listed: {text}"
    );
    assert!(steps.len() >= 4, "one line per delivery: {steps:?}");
}

#[test]
fn an_idempotent_handler_passes() {
    Adversary::new(deposits())
        .cases(64)
        .assert(|| async { fake_world(idempotent) });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Which single-fault schedules `handler` survives.
fn survives<H: Handler>(handler: fn(Arc<Mutex<Ledger>>) -> H) -> Vec<(Fault, bool)> {
    runtime().block_on(async {
        let mut verdicts = Vec::new();
        for fault in Fault::ALL {
            let result = check_schedule(
                || async { fake_world(handler) },
                &deposits(),
                &Schedule::new([fault]),
            )
            .await;
            match result {
                Ok(()) => verdicts.push((fault, true)),
                Err(AdversaryError::NotIdempotent { .. }) => verdicts.push((fault, false)),
                Err(other) => panic!("{fault}: {other}"),
            }
        }
        verdicts
    })
}

#[test]
fn each_fault_redelivers_as_described() {
    use Fault::*;
    assert_eq!(
        survives(naive),
        [
            (Deliver, true),
            (CrashBeforeAck, false),
            (RetryAfterEffect, false),
            (ConcurrentRedelivery, false),
            (CrashBeforeHandle, true),
        ]
    );
    assert!(survives(idempotent).iter().all(|(_, ok)| *ok));
    // Only two consumers at once break a check that is not atomic with the effect.
    assert_eq!(
        survives(check_then_act),
        [
            (Deliver, true),
            (CrashBeforeAck, true),
            (RetryAfterEffect, true),
            (ConcurrentRedelivery, false),
            (CrashBeforeHandle, true),
        ]
    );
}

#[test]
fn a_handler_that_never_succeeds_is_reported_stuck() {
    let always_fails = |_: Delivery| async { Err::<(), _>(HandlerError::retry("down")) };
    let error = Adversary::new(deposits())
        .cases(1)
        .policy(
            RetryPolicy::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(60))
                .max_attempts(u32::MAX),
        )
        .check(|| async { World::new(FakeBroker::new(), always_fails, || async {}) })
        .expect_err("never settles");
    assert!(matches!(error, AdversaryError::Stuck { .. }), "{error}");

    // With the default policy the messages end dead-lettered in both worlds: no difference.
    Adversary::new(deposits())
        .cases(4)
        .assert(|| async { World::new(FakeBroker::new(), always_fails, || async {}) });
}

#[tokio::test]
async fn check_refuses_to_run_inside_a_runtime() {
    let error = Adversary::new(deposits())
        .check(|| async { fake_world(idempotent) })
        .expect_err("inside a runtime");
    assert!(matches!(error, AdversaryError::Setup(_)), "{error}");
}

/// A ledger in Postgres: `applied` guarded by a primary key, in the transaction of the
/// effect, or not at all (naive).
async fn pg_world(naive: bool) -> World<PgBackend, impl Handler, i64> {
    let db = postbox::testkit::postgres()
        .await
        .expect("a Postgres server");
    sqlx::raw_sql(
        "CREATE TABLE ledger (balance bigint NOT NULL); INSERT INTO ledger VALUES (0);
         CREATE TABLE applied (message_id bigint PRIMARY KEY);",
    )
    .execute(db.pool())
    .await
    .expect("schema");
    let pool = db.pool().clone();
    let handler_pool = pool.clone();
    let handler = move |d: Delivery| {
        let pool = handler_pool.clone();
        async move {
            let amount: i64 = d.json().map_err(HandlerError::reject)?;
            let mut tx = pool.begin().await.map_err(HandlerError::retry)?;
            let first = naive
                || sqlx::query("INSERT INTO applied VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(d.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(HandlerError::retry)?
                    .rows_affected()
                    == 1;
            if first {
                sqlx::query("UPDATE ledger SET balance = balance + $1")
                    .bind(amount)
                    .execute(&mut *tx)
                    .await
                    .map_err(HandlerError::retry)?;
            }
            tx.commit().await.map_err(HandlerError::retry)
        }
    };
    World::new(db.backend(), handler, move || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar("SELECT balance FROM ledger")
                .fetch_one(&pool)
                .await
                .expect("balance")
        }
    })
    .holding(db)
}

#[test]
fn on_postgres_a_unique_key_in_the_effects_transaction_passes_and_naive_fails() {
    Adversary::new(deposits())
        .cases(8)
        .assert(|| pg_world(false));
    let error = Adversary::new(deposits())
        .cases(16)
        .check(|| pg_world(true))
        .expect_err("naive on Postgres");
    assert!(
        matches!(error, AdversaryError::NotIdempotent { .. }),
        "{error}"
    );
}
