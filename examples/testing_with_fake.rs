//! Unit-testing a service's publishing code and handler with `FakeBroker` and paused time.
//!
//! Run with: `cargo run --example testing_with_fake` (a walk-through), and
//! `cargo test --example testing_with_fake` (the tests at the bottom, which `cargo test
//! --workspace` runs too).
//!
//! The service: placing an order publishes a receipt e-mail in the same transaction; a handler
//! sends it through a mailer that sometimes times out. No database, no sleeping: the fake runs
//! on tokio's clock, so paused time jumps over retry delays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use postbox::fake::FakeBroker;
use postbox::prelude::*;
use postbox::testkit::{DrainOptions, drain};
use postbox::{Backend, Delivery, HandlerError, Message, RetryPolicy};
use serde::{Deserialize, Serialize};

/// The message the order service publishes.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    order: u64,
    to: String,
}

/// Publishes the receipt on the caller's transaction: it is sent only if the order commits.
async fn place_order<B: Backend>(
    outbox: &B,
    tx: &mut B::Conn,
    order: u64,
    to: &str,
) -> postbox::Result<()> {
    // ... the order's own writes would go here, on the same transaction ...
    let receipt = Receipt {
        order,
        to: to.into(),
    };
    outbox
        .publish(
            tx,
            Message::json("emails", &receipt)?.header("kind", "receipt"),
        )
        .await?;
    Ok(())
}

/// A mailer that fails the first `flaky` sends.
#[derive(Clone, Default)]
struct Mailer {
    flaky: u32,
    calls: Arc<AtomicU32>,
    sent: Arc<parking_lot::Mutex<Vec<u64>>>,
}

impl Mailer {
    async fn send(&self, receipt: &Receipt) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.flaky {
            return Err("smtp timeout".into());
        }
        self.sent.lock().push(receipt.order);
        Ok(())
    }
}

/// The handler: a malformed payload is rejected (dead letter), a mailer error is retried.
fn send_receipt(
    mailer: Mailer,
) -> impl Fn(Delivery) -> postbox::runtime::HandlerFuture + Send + Sync + 'static {
    move |delivery: Delivery| {
        let mailer = mailer.clone();
        Box::pin(async move {
            let receipt: Receipt = delivery.json().map_err(HandlerError::reject)?;
            mailer.send(&receipt).await.map_err(HandlerError::retry)
        })
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(30), 2.0, Duration::from_secs(600)).max_attempts(5)
}

fn main() -> anyhow::Result<()> {
    // Paused time: the 30 s and 60 s retry delays pass instantly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    runtime.block_on(async {
        let outbox = FakeBroker::new();
        let mut tx = outbox.begin().await?;
        place_order(&outbox, &mut tx, 42, "ada@example.com").await?;
        outbox.commit(tx).await?;
        println!(
            "placed order 42: {} message(s) stored",
            outbox.snapshot(None).len()
        );

        let mut tx = outbox.begin().await?;
        place_order(&outbox, &mut tx, 43, "bob@example.com").await?;
        outbox.rollback(tx).await?;
        println!(
            "order 43 rolled back: still {} message(s)",
            outbox.snapshot(None).len()
        );

        let mailer = Mailer {
            flaky: 2,
            ..Mailer::default()
        };
        let report = drain(
            &outbox,
            "emails",
            send_receipt(mailer.clone()),
            DrainOptions::default()
                .policy(policy())
                .include_scheduled(true),
        )
        .await?;
        println!(
            "drained: {} sent, {} retried, {} dead-lettered; mailer called {} times; sent {:?}",
            report.succeeded,
            report.retried,
            report.dead_lettered,
            mailer.calls.load(Ordering::SeqCst),
            mailer.sent.lock()
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use postbox::runtime::SubscriberEvent;
    use postbox::testkit::{Expect, assert_not_published, assert_published, wait_for_event_within};
    use postbox::{Outcome, Subscriber, SubscriberOptions};

    use super::*;

    #[tokio::test]
    async fn placing_an_order_publishes_its_receipt() {
        let outbox = FakeBroker::new();
        let mut tx = outbox.begin().await.expect("begin");
        place_order(&outbox, &mut tx, 7, "ada@example.com")
            .await
            .expect("publish");
        outbox.commit(tx).await.expect("commit");

        let stored = assert_published(
            &outbox,
            Expect::queue("emails")
                .header("kind", "receipt")
                .json(&Receipt {
                    order: 7,
                    to: "ada@example.com".into(),
                }),
        )
        .await;
        assert_eq!(stored.attempts, 0);
    }

    #[tokio::test]
    async fn a_rolled_back_order_sends_nothing() {
        let outbox = FakeBroker::new();
        let mut tx = outbox.begin().await.expect("begin");
        place_order(&outbox, &mut tx, 7, "ada@example.com")
            .await
            .expect("publish");
        drop(tx); // the order failed: rollback
        assert_not_published(&outbox, Expect::queue("emails")).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_flaky_mailer_is_retried_until_the_receipt_goes_out() {
        let outbox = FakeBroker::new();
        let mut tx = outbox.begin().await.expect("begin");
        place_order(&outbox, &mut tx, 7, "ada@example.com")
            .await
            .expect("publish");
        outbox.commit(tx).await.expect("commit");

        let mailer = Mailer {
            flaky: 2,
            ..Mailer::default()
        };
        let options = SubscriberOptions::new(["emails"]).retry_policy(policy());
        let worker = Subscriber::new(outbox.clone(), options, send_receipt(mailer.clone()))
            .expect("options")
            .spawn();
        let mut events = worker.events();
        wait_for_event_within(
            &mut events,
            "receipt sent",
            Duration::from_secs(3600),
            |e| {
                matches!(
                    e,
                    SubscriberEvent::Handled {
                        outcome: Outcome::Acked,
                        ..
                    }
                )
            },
        )
        .await;
        let stats = worker.shutdown().await.expect("shutdown").stats;
        assert_eq!((stats.retried, stats.acked), (2, 1));
        assert_eq!(*mailer.sent.lock(), [7]);
    }

    #[tokio::test]
    async fn a_malformed_receipt_is_dead_lettered_at_once() {
        let outbox = FakeBroker::new();
        let mut tx = outbox.begin().await.expect("begin");
        outbox
            .publish(&mut tx, Message::new("emails", "not json"))
            .await
            .expect("publish");
        outbox.commit(tx).await.expect("commit");
        let report = drain(
            &outbox,
            "emails",
            send_receipt(Mailer::default()),
            DrainOptions::default().policy(policy()),
        )
        .await
        .expect("drain");
        assert_eq!(report.dead_lettered, 1);
        assert!(outbox.dead(None)[0].reason.starts_with("rejected:"));
    }
}
