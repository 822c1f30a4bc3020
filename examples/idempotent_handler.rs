//! Is your handler idempotent? The at-least-once adversary finds out.
//!
//! Run with: `cargo run --example idempotent_handler` (prints how a naive handler fails and
//! that the fixed one passes), and `cargo test --example idempotent_handler` (the same as
//! tests, which `cargo test --workspace` runs too).
//!
//! The service credits deposits to a ledger. Postbox delivers each deposit message at least
//! once: after a crash between the handler's effect and its ack, when a lease expires while
//! the handler still runs, when a retry follows an effect. A handler that adds every delivery
//! it sees credits some deposits twice. The adversary runs the handler under random schedules
//! of those faults, compares the ledger with the one after delivering each message exactly
//! once, and shrinks a failure to the fewest faults, printed step by step.
//!
//! The ledger lives in memory here, on `FakeBroker`, so the example runs anywhere; on Postgres
//! the fix is the same idea, a processed-message key written in the effect's transaction (see
//! `tests/adversary.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use postbox::fake::FakeBroker;
use postbox::testkit::adversary::{Adversary, AdversaryError, World};
use postbox::{Delivery, Handler, HandlerError, Message, MessageId};

/// The state the handler changes.
#[derive(Debug, Default)]
struct Ledger {
    balance_cents: i64,
    /// Message ids already applied: what makes the fixed handler idempotent.
    applied: HashSet<MessageId>,
}

/// Credits every delivery: a redelivered deposit is credited twice.
fn naive_handler(ledger: Arc<Mutex<Ledger>>) -> impl Handler {
    move |delivery: Delivery| {
        let ledger = ledger.clone();
        async move {
            let cents: i64 = delivery.json().map_err(HandlerError::reject)?;
            ledger.lock().balance_cents += cents;
            Ok(())
        }
    }
}

/// Credits each message once: the check and the record happen with the effect, under one
/// lock (in a database: one transaction, with the message id as a unique key).
fn idempotent_handler(ledger: Arc<Mutex<Ledger>>) -> impl Handler {
    move |delivery: Delivery| {
        let ledger = ledger.clone();
        async move {
            let cents: i64 = delivery.json().map_err(HandlerError::reject)?;
            let mut ledger = ledger.lock();
            if ledger.applied.insert(delivery.id) {
                ledger.balance_cents += cents;
            }
            Ok(())
        }
    }
}

/// A fresh broker and ledger for one run; the adversary compares `balance_cents`.
fn world<H: Handler>(handler: fn(Arc<Mutex<Ledger>>) -> H) -> World<FakeBroker, H, i64> {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let observed = ledger.clone();
    World::new(FakeBroker::new(), handler(ledger), move || {
        let ledger = observed.clone();
        async move { ledger.lock().balance_cents }
    })
}

fn deposits() -> Vec<Message> {
    [1_000, 2_500, 400]
        .iter()
        .map(|cents| Message::json("deposits", cents).expect("an integer is JSON"))
        .collect()
}

fn check<H: Handler>(handler: fn(Arc<Mutex<Ledger>>) -> H) -> Result<(), AdversaryError> {
    Adversary::new(deposits())
        .cases(64)
        .check(|| async move { world(handler) })
}

fn main() {
    println!("== the naive handler");
    match check(naive_handler) {
        Err(e @ AdversaryError::NotIdempotent { .. }) => println!("{e}"),
        other => println!("unexpected: {other:?}"),
    }
    println!("\n== the idempotent handler");
    match check(idempotent_handler) {
        Ok(()) => {
            println!("passes 64 random schedules of crashes, retries and concurrent redeliveries")
        }
        Err(e) => println!("unexpected failure:\n{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_naive_handler_is_caught() {
        let error = check(naive_handler).expect_err("not idempotent");
        assert!(
            matches!(error, AdversaryError::NotIdempotent { ref once, .. } if once == "3900"),
            "{error}"
        );
    }

    #[test]
    fn the_idempotent_handler_passes() {
        check(idempotent_handler).unwrap_or_else(|e| panic!("{e}"));
    }
}
