//! A worker: a subscriber that consumes a queue, retries failures, and shuts down gracefully.
//!
//! Run with: `cargo run --example worker`
//!
//! Publishes a few messages (one of which fails twice before it succeeds), runs a subscriber
//! until all are handled, then shuts it down and prints what happened. Needs no database
//! set-up (it uses the testkit's default server, like `quickstart`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use postbox::prelude::*;
use postbox::runtime::SubscriberEvent;
use postbox::{Delivery, HandlerError, Message, RetryPolicy, Subscriber, SubscriberOptions};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("postbox=info")),
        )
        .init();

    let db = postbox::testkit::postgres().await?;
    let outbox = db.backend();

    // The handler: idempotent, as at-least-once delivery requires. "flaky" fails twice.
    let flaky_failures = Arc::new(AtomicU32::new(0));
    let failures = Arc::clone(&flaky_failures);
    let handler = move |delivery: Delivery| {
        let failures = Arc::clone(&failures);
        async move {
            let body = String::from_utf8_lossy(&delivery.payload).into_owned();
            if body == "flaky" && failures.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(HandlerError::retry("upstream timed out"));
            }
            println!(
                "handled message {} ({body}), attempt {}",
                delivery.id,
                delivery.attempts + 1
            );
            Ok(())
        }
    };

    let options = SubscriberOptions::new(["jobs"])
        .max_workers(4)
        .retry_policy(RetryPolicy::constant(Duration::from_millis(200)).max_attempts(5))
        // Retried messages come back by polling (no notification for a retry): poll often.
        .min_fetch_interval(Duration::from_millis(100))
        .max_fetch_interval(Duration::from_secs(1));
    let worker = Subscriber::new(outbox.clone(), options, handler)?.spawn();
    let mut events = worker.events();

    let mut tx = outbox.begin().await?;
    let messages = ["welcome email", "flaky", "invoice", "report"];
    outbox
        .publish_batch(
            &mut tx,
            messages.iter().map(|m| Message::new("jobs", *m)).collect(),
        )
        .await?;
    outbox.commit(tx).await?;

    // Wait until every message is acked (a real service would wait for SIGTERM instead).
    let mut acked = 0;
    while acked < messages.len() {
        if let SubscriberEvent::Handled {
            outcome: postbox::Outcome::Acked,
            ..
        } = events.recv().await?
        {
            acked += 1;
        }
    }

    let report = worker.shutdown().await?;
    println!(
        "shut down: acked {}, retried {}, dead-lettered {}, released {}",
        report.stats.acked, report.stats.retried, report.stats.dead_lettered, report.released
    );
    db.close().await?;
    Ok(())
}
