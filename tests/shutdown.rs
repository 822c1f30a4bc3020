//! Shutting a subscriber down: on a signal or any future, and with running handlers asked to
//! stop `shutdown_grace` before the timeout aborts them. On the fake under paused time (the
//! runtime's timing), and on Postgres (what the outcome does to the row).

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures_util::FutureExt;
use parking_lot::Mutex;
use postbox::fake::FakeBroker;
use postbox::prelude::*;
use postbox::runtime::{SubscriberEvent, shutdown_signal};
use postbox::testkit::{until_within, wait_for_event_within, within};
use postbox::{
    Backend, Delivery, FetchParams, HandlerError, Message, PgBackend, Subscriber, SubscriberOptions,
};
use support::count;
use tokio::time::Instant;

/// Virtual time to wait for a condition under paused time (the clock jumps over idle waits).
const HOUR: Duration = Duration::from_secs(3600);

/// When each handler started and when it saw the stop signal, by payload.
#[derive(Default)]
struct Seen {
    started: Vec<String>,
    cancelled: Vec<(String, Instant)>,
}

/// A handler for payloads `watch` (works until asked to stop, then ends with `Ok`),
/// `give-back` (the same, ending with a retry due at once) and anything else (ignores the
/// signal and never ends).
fn handler(
    seen: Arc<Mutex<Seen>>,
) -> impl Fn(Delivery) -> postbox::runtime::HandlerFuture + Send + Sync {
    move |delivery: Delivery| -> postbox::runtime::HandlerFuture {
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            let payload = String::from_utf8_lossy(&delivery.payload).into_owned();
            seen.lock().started.push(payload.clone());
            if payload != "watch" && payload != "give-back" {
                std::future::pending::<()>().await;
            }
            delivery.cancelled().await;
            assert!(delivery.is_cancelled());
            seen.lock()
                .cancelled
                .push((payload.clone(), Instant::now()));
            if payload == "give-back" {
                return Err(HandlerError::retry_after(Duration::ZERO, "shutting down"));
            }
            Ok(())
        })
    }
}

async fn publish_payloads<B: Backend>(backend: &B, payloads: &[&str]) -> Vec<i64> {
    let mut tx = backend.begin().await.expect("begin");
    let messages = payloads.iter().map(|p| Message::new("q", *p)).collect();
    let ids = backend
        .publish_batch(&mut tx, messages)
        .await
        .expect("publish");
    backend.commit(tx).await.expect("commit");
    ids
}

#[tokio::test(start_paused = true)]
async fn running_handlers_are_asked_to_stop_the_grace_before_the_timeout() {
    let broker = FakeBroker::new();
    let ids = publish_payloads(&broker, &["watch", "ignore"]).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let options = SubscriberOptions::new(["q"])
        .shutdown_timeout(Duration::from_secs(10))
        .shutdown_grace(Duration::from_secs(3));
    let sub = Subscriber::new(broker.clone(), options, handler(Arc::clone(&seen)))
        .expect("options")
        .spawn();
    let mut events = sub.events();
    until_within("both handlers to start", HOUR, || {
        seen.lock().started.len() == 2
    })
    .await;

    let asked = Instant::now();
    let report = within("shutdown", sub.shutdown()).await.expect("shutdown");
    assert_eq!(
        (report.cancelled, report.abandoned, report.stats.acked),
        (2, 1, 1),
        "both were asked, the watching one ended and was acked, the other was aborted"
    );
    let cancelled = seen.lock().cancelled.clone();
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    let after = cancelled[0].1 - asked;
    assert!(
        after >= Duration::from_secs(7) && after < Duration::from_secs(10),
        "asked {after:?} into a 10 s shutdown with a 3 s grace: expected 7 s"
    );
    wait_for_event_within(&mut events, "the cancel event", HOUR, |e| {
        *e == SubscriberEvent::HandlersCancelled { n: 2 }
    })
    .await;
    let left: Vec<i64> = broker.snapshot(None).iter().map(|m| m.id).collect();
    assert_eq!(left, [ids[1]], "the aborted handler's message is kept");
}

#[tokio::test(start_paused = true)]
async fn a_grace_at_or_above_the_timeout_asks_handlers_at_once() {
    let broker = FakeBroker::new();
    publish_payloads(&broker, &["watch"]).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let options = SubscriberOptions::new(["q"])
        .shutdown_timeout(Duration::from_secs(10))
        .shutdown_grace(Duration::from_secs(60));
    let sub = Subscriber::new(broker.clone(), options, handler(Arc::clone(&seen)))
        .expect("options")
        .spawn();
    until_within("the handler to start", HOUR, || {
        !seen.lock().started.is_empty()
    })
    .await;
    let asked = Instant::now();
    let report = within("shutdown", sub.shutdown()).await.expect("shutdown");
    assert_eq!(
        (report.cancelled, report.abandoned, report.stats.acked),
        (1, 0, 1)
    );
    let after = seen.lock().cancelled[0].1 - asked;
    assert!(after < Duration::from_secs(1), "asked after {after:?}");
    assert!(broker.snapshot(None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_ends_in_time_is_never_asked_to_stop() {
    let broker = FakeBroker::new();
    publish_payloads(&broker, &["quick"]).await;
    let options = SubscriberOptions::new(["q"])
        .shutdown_timeout(Duration::from_secs(10))
        .shutdown_grace(Duration::from_secs(3));
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let cancelled_seen = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&cancelled_seen);
    let handler = move |delivery: Delivery| -> postbox::runtime::HandlerFuture {
        let gate = gate.lock().take();
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            // Ends 2 s into the shutdown, before the signal at 7 s.
            tokio::time::sleep(Duration::from_secs(2)).await;
            *seen.lock() = Some(delivery.is_cancelled());
            Ok(())
        })
    };
    let sub = Subscriber::new(broker.clone(), options, handler)
        .expect("options")
        .spawn();
    until_within("the fetch", HOUR, || broker.counters().fetched == 1).await;
    let shutdown = tokio::spawn(sub.shutdown());
    let _ = release.send(());
    let report = within("shutdown", shutdown)
        .await
        .expect("join")
        .expect("shutdown");
    assert_eq!(
        (report.cancelled, report.abandoned, report.stats.acked),
        (0, 0, 1)
    );
    assert_eq!(*cancelled_seen.lock(), Some(false));
}

#[tokio::test(start_paused = true)]
async fn shutdown_on_runs_until_its_future_resolves() {
    let broker = FakeBroker::new();
    publish_payloads(&broker, &["a", "b"]).await;
    let handler = |_: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(broker.clone(), SubscriberOptions::new(["q"]), handler)
        .expect("options")
        .spawn();
    let (stop, signal) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(sub.shutdown_on(signal));
    until_within("the first two acks", HOUR, || broker.counters().acked == 2).await;
    // Still consuming after being handed its signal.
    publish_payloads(&broker, &["c"]).await;
    until_within("the third ack", HOUR, || broker.counters().acked == 3).await;
    assert!(!running.is_finished(), "stopped before its signal");

    stop.send(()).expect("signal");
    let report = within("shutdown", running)
        .await
        .expect("join")
        .expect("shutdown");
    assert_eq!(report.stats.acked, 3);
    publish_payloads(&broker, &["d"]).await;
    tokio::time::sleep(HOUR).await;
    assert_eq!(
        broker.counters().acked,
        3,
        "nothing consumed after the shutdown"
    );
}

#[tokio::test]
async fn shutdown_on_returns_when_the_subscriber_stops_by_itself() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let pool = postbox::sqlx::PgPool::connect(db.url()).await?;
    let handler = |_: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(
        PgBackend::new(pool.clone()),
        SubscriberOptions::new(["q"]),
        handler,
    )?
    .spawn();
    let mut events = sub.events();
    wait_for_event_within(&mut events, "idle", support::wait(), |e| {
        *e == SubscriberEvent::Idle
    })
    .await;
    pool.close().await;
    let report = within("the stop", sub.shutdown_on(std::future::pending::<()>())).await?;
    assert_eq!(report.stats.acked, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn on_postgres_a_handler_giving_back_its_message_at_the_signal_leaves_it_ready() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ids = publish_payloads(&backend, &["give-back"]).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let options = SubscriberOptions::new(["q"])
        .shutdown_timeout(Duration::from_secs(60))
        .shutdown_grace(Duration::from_secs(60));
    let sub = Subscriber::new(backend.clone(), options, handler(Arc::clone(&seen)))?.spawn();
    until_within("the handler to start", support::wait(), || {
        !seen.lock().started.is_empty()
    })
    .await;
    let report = within("shutdown", sub.shutdown()).await?;
    assert_eq!(
        (report.cancelled, report.abandoned, report.stats.retried),
        (1, 0, 1)
    );
    assert_eq!(
        count(db.pool(), "postbox", "acquired_token IS NOT NULL").await,
        0
    );
    let again = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
    assert_eq!(again[0].attempts, 1, "the retry is recorded");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_termination_signals_resolve_shutdown_signal() -> Result<()> {
    // Both signals in one test: a signal raised by a test running in parallel would resolve
    // another test's future early.
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut stop = Box::pin(shutdown_signal()?);
        assert!(
            (&mut stop).now_or_never().is_none(),
            "resolved before any signal"
        );
        // SAFETY: `kill` with our own pid and a signal whose handler tokio installed above.
        let sent = unsafe { libc::kill(libc::getpid(), signal) };
        assert_eq!(sent, 0, "kill failed");
        within("the signal", stop).await;
    }

    // And through a subscriber: SIGTERM shuts it down.
    let broker = FakeBroker::new();
    let handler = |_: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(broker, SubscriberOptions::new(["q"]), handler)?.spawn();
    let stopping = tokio::spawn(sub.shutdown_on(shutdown_signal()?));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    let report = within("the shutdown on SIGTERM", stopping).await??;
    assert_eq!(report.stats.acked, 0);
    Ok(())
}
