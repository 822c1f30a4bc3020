//! Fan-out: one topic of domain events feeds two services, each through a subscription of
//! its own; the e-mail service runs three cooperating subscribers that split its messages.
//!
//! Run with: `cargo run --example fan_out`. It publishes 1,000 events in the publisher's
//! transactions, lets both services drain their subscriptions, prints what each subscriber
//! handled, and checks that each subscription handled every event exactly once (the union of
//! the e-mail subscribers included). It exits non-zero otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use postbox::prelude::*;
use postbox::topic::Published;
use postbox::{
    Delivery, HandlerError, Message, MessageId, PgBackend, Subscriber, SubscriberOptions, Topics,
};

const EVENTS: usize = 1_000;
const TOPIC: &str = "orders.events";

/// Who handled what: (subscription, subscriber) -> ids.
type Handled = Arc<parking_lot::Mutex<BTreeMap<(&'static str, usize), Vec<MessageId>>>>;

/// Starts one subscriber of `subscription` recording what it handles.
fn subscriber(
    backend: &PgBackend,
    subscription: &'static str,
    n: usize,
    handled: &Handled,
) -> anyhow::Result<postbox::runtime::SubscriberHandle> {
    let sink = Arc::clone(handled);
    let handler = move |d: Delivery| {
        let sink = Arc::clone(&sink);
        async move {
            tokio::time::sleep(Duration::from_micros(200)).await; // a little work
            sink.lock().entry((subscription, n)).or_default().push(d.id);
            Ok::<(), HandlerError>(())
        }
    };
    let options = SubscriberOptions::new([TOPIC])
        .subscription(subscription)
        .max_workers(8)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200));
    Ok(Subscriber::new(backend.clone(), options, handler)?.spawn())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();

    // Each service subscribes at start-up (idempotent): from now on it receives every event.
    backend.subscribe(TOPIC, "email").await?;
    backend.subscribe(TOPIC, "analytics").await?;

    let handled: Handled = Arc::default();
    let mut subscribers = vec![subscriber(&backend, "analytics", 1, &handled)?];
    for n in 1..=3 {
        subscribers.push(subscriber(&backend, "email", n, &handled)?);
    }

    // The publisher writes each event once, in its own transactions.
    let mut published = BTreeSet::new();
    for chunk in 0..EVENTS / 100 {
        let mut tx = backend.begin().await?;
        let events = (0..100)
            .map(|i| Message::new(TOPIC, format!("order {} placed", chunk * 100 + i)))
            .collect();
        published.extend(
            backend
                .publish_to_topics(&mut tx, events)
                .await?
                .into_iter()
                .map(Published::id),
        );
        backend.commit(tx).await?;
    }

    // Wait until both subscriptions have processed everything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let backlog: i64 = backend
            .subscriptions(Some(TOPIC))
            .await?
            .iter()
            .map(|s| s.backlog)
            .sum();
        if backlog == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{backlog} event(s) still unprocessed after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for sub in subscribers {
        sub.shutdown().await?;
    }

    let handled = handled.lock().clone();
    let mut ok = true;
    for subscription in ["email", "analytics"] {
        let mut union = BTreeSet::new();
        let mut total = 0;
        for ((s, n), ids) in &handled {
            if *s == subscription {
                println!("{subscription} subscriber {n}: {} event(s)", ids.len());
                total += ids.len();
                union.extend(ids.iter().copied());
            }
        }
        let missing = published.difference(&union).count();
        let twice = total - union.len();
        println!(
            "{subscription}: handled {} of {} events, twice {twice}, missing {missing}",
            union.len(),
            published.len()
        );
        ok &= union == published && twice == 0;
    }
    db.close().await?;
    if !ok {
        bail!("a subscription did not handle every event exactly once");
    }
    println!("every subscription handled every event exactly once");
    Ok(())
}
