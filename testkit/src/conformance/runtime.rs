//! The subscriber runtime on the backend: delivery, retries, panics, shutdown.

use std::time::Duration;

use postbox_core::runtime::{HandlerFuture, SubscriberEvent};
use postbox_core::{
    Delivery, HandlerError, Message, MessageState, Outcome, RetryPolicy, Subscriber,
    SubscriberOptions,
};
use tokio::sync::{mpsc, watch};

use super::{Harness, publish};
use crate::wait::{deadline, wait_for_event, within};
use postbox_core::prelude::*;

fn fast(queue: &str) -> SubscriberOptions {
    SubscriberOptions::new([queue])
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(50))
}

async fn recv_n(rx: &mut mpsc::UnboundedReceiver<i64>, n: usize) -> Vec<i64> {
    let until = tokio::time::Instant::now() + deadline();
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(id)) => got.push(id),
            _ => panic!("got {} of {n} deliveries", got.len()),
        }
    }
    got
}

/// Every message reaches the handler once and is acked.
pub async fn runtime_delivers_every_message_and_acks_it<H: Harness>(h: &H) {
    let b = h.backend();
    let mut published = publish(
        b,
        (0..50).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = move |d: Delivery| {
        let _ = tx.send(d.id);
        std::future::ready(Ok::<(), HandlerError>(()))
    };
    let sub = Subscriber::new(b.clone(), fast("q"), handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    let mut got = recv_n(&mut rx, 50).await;
    for _ in 0..50 {
        wait_for_event(&mut events, "ack", |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::Acked,
                    ..
                }
            )
        })
        .await;
    }
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    got.sort_unstable();
    published.sort_unstable();
    assert_eq!(got, published, "each message exactly once");
    assert_eq!(stats.acked, 50);
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// A failing handler is retried per the policy, then dead-lettered.
pub async fn runtime_retries_then_dead_letters<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let handler = |_d: Delivery| std::future::ready(Err::<(), _>(HandlerError::retry("always")));
    let options = fast("q").retry_policy(RetryPolicy::constant(Duration::ZERO).max_attempts(3));
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    wait_for_event(&mut events, "dead letter", |e| {
        matches!(
            e,
            SubscriberEvent::Handled {
                outcome: Outcome::DeadLettered { .. },
                ..
            }
        )
    })
    .await;
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!((stats.retried, stats.dead_lettered, stats.acked), (2, 1, 0));
    let dead = b.dead_letters(None).await.expect("dead");
    assert_eq!((dead.len(), dead[0].attempts), (1, 3));
}

/// A panicking handler counts as a failure and goes through the policy.
pub async fn runtime_treats_a_panic_as_a_failure<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let handler = |_d: Delivery| -> HandlerFuture { Box::pin(async { panic!("kaboom") }) };
    let options = fast("q").retry_policy(RetryPolicy::none());
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    wait_for_event(&mut events, "dead letter", |e| {
        matches!(
            e,
            SubscriberEvent::Handled {
                outcome: Outcome::DeadLettered { .. },
                ..
            }
        )
    })
    .await;
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!(stats.panics, 1);
    let dead = b.dead_letters(None).await.expect("dead");
    assert!(
        dead[0].reason.contains("handler panicked: kaboom"),
        "{}",
        dead[0].reason
    );
}

/// Shutdown gives unstarted messages back at once and lets the running handler finish.
pub async fn runtime_shutdown_releases_unstarted_messages<H: Harness>(h: &H) {
    let b = h.backend();
    let p = publish(
        b,
        (0..4).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let (open, gate) = watch::channel(false);
    let (tx, mut started) = mpsc::unbounded_channel();
    let handler = move |d: Delivery| -> HandlerFuture {
        let _ = tx.send(d.id);
        let mut gate = gate.clone();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok(())
        })
    };
    let options = fast("q").max_workers(1).prefetch(3);
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    assert_eq!(recv_n(&mut started, 1).await, [p[0]]);
    let shutdown = tokio::spawn(sub.shutdown());
    wait_for_event(&mut events, "release", |e| {
        *e == SubscriberEvent::Released { n: 3 }
    })
    .await;
    let states: Vec<_> = b
        .messages(None)
        .await
        .expect("messages")
        .iter()
        .map(|m| (m.id, m.state))
        .collect();
    assert_eq!(
        states,
        [
            (p[0], MessageState::Leased),
            (p[1], MessageState::Ready),
            (p[2], MessageState::Ready),
            (p[3], MessageState::Ready)
        ]
    );
    let _ = open.send(true);
    let report = within("shutdown", shutdown)
        .await
        .expect("join")
        .expect("shutdown");
    assert_eq!((report.released, report.stats.acked), (3, 1));
    assert_eq!(
        b.messages(None).await.expect("messages").len(),
        3,
        "nothing unprocessed deleted"
    );
}
