//! The subscriber runtime against real Postgres.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use postbox::pg::{FETCH_APPLICATION_NAME, LISTEN_APPLICATION_NAME};
use postbox::prelude::*;
use postbox::runtime::SubscriberEvent;
use postbox::testkit::within;
use postbox::{
    Delivery, FetchParams, HandlerError, Outcome, PgBackend, RetryPolicy, Subscriber,
    SubscriberOptions,
};
use support::no_engine::NoEngine;
use support::{count, kill, pids_of, publish_n, recv_n, until};
use tokio::sync::{mpsc, watch};

/// A handler that reports each delivery's id on a channel.
fn reporting() -> (
    impl Fn(Delivery) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static,
    mpsc::UnboundedReceiver<i64>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        move |d: Delivery| {
            let _ = tx.send(d.id);
            std::future::ready(Ok(()))
        },
        rx,
    )
}

/// A handler that reports each delivery's id when it starts, then waits until `gate` opens.
fn gated(
    gate: watch::Receiver<bool>,
) -> (
    impl Fn(Delivery) -> postbox::runtime::HandlerFuture + Send + Sync + 'static,
    mpsc::UnboundedReceiver<i64>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        move |d: Delivery| -> postbox::runtime::HandlerFuture {
            let _ = tx.send(d.id);
            let mut gate = gate.clone();
            Box::pin(async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(())
            })
        },
        rx,
    )
}

/// Polling so slow that only a notification can explain a quick pick-up.
fn slow_polling(queue: &str) -> SubscriberOptions {
    SubscriberOptions::new([queue])
        .min_fetch_interval(Duration::from_secs(30))
        .max_fetch_interval(Duration::from_secs(30))
}

#[tokio::test]
async fn a_notification_wakes_an_idle_subscriber_long_before_the_poll() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let (handler, mut handled) = reporting();
    let sub = Subscriber::new(backend.clone(), slow_polling("q"), handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "LISTEN", |e| {
        *e == SubscriberEvent::ListenerConnected
    })
    .await;
    until(&mut events, "idle", |e| *e == SubscriberEvent::Idle).await;

    let ids = publish_n(&backend, "q", 1).await;
    let got = tokio::time::timeout(Duration::from_secs(2), handled.recv()).await;
    assert_eq!(
        got?,
        Some(ids[0]),
        "delivered within 2 s although polling is every 30 s"
    );
    until(&mut events, "ack", |e| {
        matches!(e, SubscriberEvent::Handled { .. })
    })
    .await;

    // Another queue's notification does not wake it: one fetch for two notifications.
    let fetches = sub.stats().fetches;
    publish_n(&backend, "other", 1).await;
    let ids = publish_n(&backend, "q", 1).await;
    let got = tokio::time::timeout(Duration::from_secs(2), handled.recv()).await;
    assert_eq!(got?, Some(ids[0]));
    until(&mut events, "ack", |e| {
        matches!(e, SubscriberEvent::Handled { .. })
    })
    .await;
    assert_eq!(
        sub.stats().fetches - fetches,
        1,
        "only the subscribed queue woke the loop"
    );
    within("shutdown", sub.shutdown()).await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn every_fetch_of_a_subscriber_runs_on_one_persistent_connection() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let (handler, mut handled) = reporting();
    let sub = Subscriber::new(backend.clone(), slow_polling("q"), handler)?.spawn();
    let mut events = sub.events();
    // Both connections come up, in either order.
    let (mut backend_pid, mut listening) = (None, false);
    while backend_pid.is_none() || !listening {
        match until(&mut events, "connections", |e| {
            matches!(
                e,
                SubscriberEvent::FetchConnected { .. } | SubscriberEvent::ListenerConnected
            )
        })
        .await
        {
            SubscriberEvent::FetchConnected { session_id } => {
                backend_pid = Some(i32::try_from(session_id).expect("a Postgres pid"))
            }
            _ => listening = true,
        }
    }
    let backend_pid = backend_pid.expect("connected");
    for round in 0..3 {
        publish_n(&backend, "q", 5).await;
        recv_n(&mut handled, 5).await;
        assert_eq!(
            pids_of(db.pool(), FETCH_APPLICATION_NAME).await,
            [backend_pid],
            "round {round}"
        );
        assert_eq!(pids_of(db.pool(), LISTEN_APPLICATION_NAME).await.len(), 1);
    }
    let stats = within("shutdown", sub.shutdown()).await?.stats;
    assert!(stats.fetches >= 4, "{stats:?}");
    // The server backend exits shortly after the client closes: wait for it, with a deadline.
    let until = tokio::time::Instant::now() + support::wait();
    while !pids_of(db.pool(), FETCH_APPLICATION_NAME).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < until,
            "fetch connection not closed at shutdown"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn without_listen_it_delivers_by_polling_and_listen_recovers_later() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    backend.fail_next_listens(2);
    let (handler, mut handled) = reporting();
    let options = SubscriberOptions::new(["q"])
        .min_fetch_interval(Duration::from_millis(50))
        .max_fetch_interval(Duration::from_millis(200))
        .wake_up_retry_interval(Duration::from_millis(200));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "LISTEN lost", |e| {
        matches!(e, SubscriberEvent::ListenerLost { .. })
    })
    .await;
    let ids = publish_n(&backend, "q", 3).await;
    let mut got = recv_n(&mut handled, 3).await;
    got.sort();
    assert_eq!(got, ids, "delivered by polling");
    until(&mut events, "LISTEN restored", |e| {
        *e == SubscriberEvent::ListenerRestored
    })
    .await;
    assert_eq!(pids_of(db.pool(), LISTEN_APPLICATION_NAME).await.len(), 1);
    within("shutdown", sub.shutdown()).await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn killing_the_fetch_connection_mid_run_loses_nothing() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ids = publish_n(&backend, "q", 300).await;
    let (open, gate) = watch::channel(false);
    let (handler, mut started) = gated(gate);
    let options = SubscriberOptions::new(["q"])
        .max_workers(8)
        .prefetch(8)
        .error_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    let mut seen = recv_n(&mut started, 8).await;
    let mut outcomes = sub.events();
    assert_eq!(kill(db.pool(), FETCH_APPLICATION_NAME).await, 1);
    open.send(true)?;

    seen.extend(recv_n(&mut started, 292).await);
    until(&mut events, "backoff", |e| {
        matches!(e, SubscriberEvent::BackoffStarted { .. })
    })
    .await;
    until(&mut events, "reconnect", |e| {
        matches!(e, SubscriberEvent::FetchConnected { .. })
    })
    .await;
    for _ in 0..300 {
        until(&mut outcomes, "ack", |e| {
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
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    let distinct: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(
        distinct,
        ids.iter().copied().collect::<HashSet<_>>(),
        "every message handled"
    );
    let stats = within("shutdown", sub.shutdown()).await?.stats;
    assert_eq!(stats.acked, 300, "{stats:?}");
    assert!(stats.errors >= 1, "{stats:?}");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn killing_the_listen_connection_reconnects_and_wake_ups_resume() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let (handler, mut handled) = reporting();
    let sub = Subscriber::new(backend.clone(), slow_polling("q"), handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "LISTEN", |e| {
        *e == SubscriberEvent::ListenerConnected
    })
    .await;
    assert_eq!(kill(db.pool(), LISTEN_APPLICATION_NAME).await, 1);
    until(&mut events, "LISTEN lost", |e| {
        matches!(e, SubscriberEvent::ListenerLost { .. })
    })
    .await;
    until(&mut events, "LISTEN back", |e| {
        *e == SubscriberEvent::ListenerConnected
    })
    .await;

    let ids = publish_n(&backend, "q", 1).await;
    let got = tokio::time::timeout(Duration::from_secs(2), handled.recv()).await;
    assert_eq!(
        got?,
        Some(ids[0]),
        "woken by a notification on the new LISTEN connection"
    );
    within("shutdown", sub.shutdown()).await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn failures_retry_per_policy_then_dead_letter_and_panics_count_as_failures() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut tx = backend.begin().await?;
    backend
        .publish_batch(
            &mut tx,
            ["ok", "fail", "panic"]
                .map(|p| postbox::Message::new("q", p))
                .into(),
        )
        .await?;
    backend.commit(tx).await?;
    let handler = |d: Delivery| async move {
        match d.payload.as_slice() {
            b"fail" => Err(HandlerError::retry("smtp down")),
            b"panic" => panic!("boom"),
            _ => Ok(()),
        }
    };
    let options = SubscriberOptions::new(["q"])
        .retry_policy(RetryPolicy::constant(Duration::ZERO).max_attempts(3))
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(50));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    for _ in 0..2 {
        until(&mut events, "dead letter", |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::DeadLettered { .. },
                    ..
                }
            )
        })
        .await;
    }
    let stats = within("shutdown", sub.shutdown()).await?.stats;
    assert_eq!(
        (
            stats.acked,
            stats.retried,
            stats.dead_lettered,
            stats.panics
        ),
        (1, 4, 2, 3),
        "{stats:?}"
    );
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    assert_eq!(
        count(
            db.pool(),
            "postbox_dead",
            "attempts = 3 AND reason LIKE '%exhausted after 3 attempts: smtp down'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            db.pool(),
            "postbox_dead",
            "attempts = 3 AND reason LIKE '%handler panicked: boom'"
        )
        .await,
        1
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn shutdown_releases_prefetched_rows_and_lets_the_running_handler_finish() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ids = publish_n(&backend, "q", 6).await;
    let (open, gate) = watch::channel(false);
    let (handler, mut started) = gated(gate);
    let options = SubscriberOptions::new(["q"]).max_workers(1).prefetch(5);
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    let running = recv_n(&mut started, 1).await[0];
    assert_eq!(running, ids[0]);

    let shutdown = tokio::spawn(sub.shutdown());
    until(&mut events, "release", |e| {
        *e == SubscriberEvent::Released { n: 5 }
    })
    .await;
    // Released rows are fetchable at once by another consumer, while the handler still runs.
    let other = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(other.iter().map(|d| d.id).collect::<Vec<_>>(), ids[1..]);
    assert!(
        other.iter().all(|d| d.deliveries == 1),
        "a release does not count as a delivery"
    );

    open.send(true)?;
    let report = shutdown.await??;
    assert_eq!(
        (report.released, report.abandoned, report.stats.acked),
        (5, 0, 1)
    );
    assert_eq!(
        count(db.pool(), "postbox", "true").await,
        5,
        "nothing unprocessed was deleted"
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_handler_past_the_shutdown_timeout_is_abandoned_and_its_row_kept() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    publish_n(&backend, "q", 1).await;
    let (_open, gate) = watch::channel(false);
    let (handler, mut started) = gated(gate);
    let options = SubscriberOptions::new(["q"]).shutdown_timeout(Duration::from_millis(100));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    recv_n(&mut started, 1).await;
    let report = within("shutdown", sub.shutdown()).await?;
    assert_eq!((report.abandoned, report.stats.acked), (1, 0));
    assert_eq!(
        count(db.pool(), "postbox", "acquired_token IS NOT NULL").await,
        1,
        "kept, still leased"
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn leases_of_slow_handlers_are_renewed() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ids = publish_n(&backend, "q", 1).await;
    let (open, gate) = watch::channel(false);
    let (handler, mut started) = gated(gate);
    let ttl = Duration::from_millis(600);
    let options = SubscriberOptions::new(["q"]).lease_ttl(ttl);
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    recv_n(&mut started, 1).await;
    for _ in 0..4 {
        until(&mut events, "renewal", |e| {
            matches!(e, SubscriberEvent::LeasesRenewed { .. })
        })
        .await;
    }
    // Well past one TTL since the fetch, the lease is still fresh: nobody can take it.
    assert!(
        backend
            .fetch(&FetchParams::new(["q"], 1).lease_ttl(ttl))
            .await?
            .is_empty()
    );
    open.send(true)?;
    until(&mut events, "ack", |e| {
        *e == SubscriberEvent::Handled {
            id: ids[0],
            outcome: Outcome::Acked,
        }
    })
    .await;
    within("shutdown", sub.shutdown()).await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn without_an_engine_it_polls_and_opens_no_connection_of_its_own() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = NoEngine(db.backend());
    let ids = publish_n(&backend, "q", 5).await;
    let (handler, mut handled) = reporting();
    let options = SubscriberOptions::new(["q"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(50));
    let sub = Subscriber::new(backend, options, handler)?.spawn();
    let mut events = sub.events();
    let mut got = recv_n(&mut handled, 5).await;
    got.sort();
    assert_eq!(got, ids);
    until(&mut events, "idle", |e| *e == SubscriberEvent::Idle).await;
    assert!(pids_of(db.pool(), FETCH_APPLICATION_NAME).await.is_empty());
    assert!(pids_of(db.pool(), LISTEN_APPLICATION_NAME).await.is_empty());
    let stats = within("shutdown", sub.shutdown()).await?.stats;
    assert_eq!(stats.acked, 5);
    let mut rest = Vec::new();
    while let Ok(e) = events.try_recv() {
        rest.push(e);
    }
    assert!(
        !rest.iter().any(|e| matches!(
            e,
            SubscriberEvent::FetchConnected { .. }
                | SubscriberEvent::ListenerConnected
                | SubscriberEvent::ListenerLost { .. }
        )),
        "{rest:?}"
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn batched_acks_use_fewer_statements_than_per_row_acks() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    for batch in [true, false] {
        publish_n(&backend, "q", 200).await;
        let (handler, mut handled) = reporting();
        let options = SubscriberOptions::new(["q"])
            .batch_acks(batch)
            .max_workers(16)
            .prefetch(32);
        let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
        recv_n(&mut handled, 200).await;
        let stats = within("shutdown", sub.shutdown()).await?.stats;
        assert_eq!(stats.acked, 200);
        if batch {
            assert!(stats.ack_statements < 200, "{stats:?}");
        } else {
            assert_eq!(stats.ack_statements, 200, "{stats:?}");
        }
        assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    }
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_subscriber_stops_by_itself_when_its_pool_is_closed() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let pool = postbox::sqlx::PgPool::connect(db.url()).await?;
    let backend = PgBackend::new(pool.clone());
    let (handler, _handled) = reporting();
    let sub = Subscriber::new(backend, SubscriberOptions::new(["q"]), handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "idle", |e| *e == SubscriberEvent::Idle).await;
    pool.close().await;
    until(&mut events, "stopped", |e| *e == SubscriberEvent::Stopped).await;
    assert!(!sub.is_running());
    assert_eq!(sub.last_error().as_deref(), Some("backend closed"));
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn bad_options_are_refused_at_construction() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let (handler, _rx) = reporting();
    let err = Subscriber::new(
        db.backend(),
        SubscriberOptions::new(["q"]).max_workers(0),
        handler,
    )
    .expect_err("zero workers");
    assert!(err.to_string().contains("max_workers"), "{err}");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn with_listen_turned_off_it_polls_on_its_fetch_connection_only() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let (handler, mut handled) = reporting();
    let options = SubscriberOptions::new(["q"])
        .wake_ups(false)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(50));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "fetch connection", |e| {
        matches!(e, SubscriberEvent::FetchConnected { .. })
    })
    .await;
    let ids = publish_n(&backend, "q", 2).await;
    let mut got = recv_n(&mut handled, 2).await;
    got.sort();
    assert_eq!(got, ids);
    assert!(pids_of(db.pool(), LISTEN_APPLICATION_NAME).await.is_empty());
    assert_eq!(pids_of(db.pool(), FETCH_APPLICATION_NAME).await.len(), 1);
    within("shutdown", sub.shutdown()).await?;
    db.close().await?;
    Ok(())
}

/// A subscriber queued for a fetch permit (`max_concurrent_fetches(1)`, the permit held by a
/// fetch stuck on a row lock) goes on acking what its handlers finish meanwhile: the queue
/// delays its next fetch, not its outcomes.
#[tokio::test]
async fn a_subscriber_waiting_for_a_fetch_permit_still_writes_its_acks() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db
        .backend()
        .max_concurrent_fetches(std::num::NonZeroUsize::MIN);
    publish_n(&backend, "q", 10).await;

    let (release, gate) = watch::channel(false);
    let handler = move |_: Delivery| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok::<(), HandlerError>(())
        }
    };
    let options = SubscriberOptions::new(["q"])
        .max_workers(10)
        .prefetch(10)
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(20));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = sub.events();
    until(&mut events, "the ten rows fetched", |e| {
        matches!(e, SubscriberEvent::Fetched { n: 10 })
    })
    .await;

    // Take the only permit with a receive that blocks on a member row the test holds locked.
    let blocker = support::stuck_receive(db.pool(), &backend, "other", 1).await;
    support::eventually("the subscriber to queue for the permit", || async {
        backend.fetches_waiting() == 1
    })
    .await;

    release.send(true)?;
    let mut acked = 0;
    while acked < 10 {
        if let SubscriberEvent::Handled { outcome, .. } = until(&mut events, "the ten acks", |e| {
            matches!(e, SubscriberEvent::Handled { .. })
        })
        .await
        {
            assert_eq!(outcome, Outcome::Acked);
            acked += 1;
        }
    }
    assert_eq!(
        count(db.pool(), "postbox", "true").await,
        0,
        "all ten deleted"
    );
    assert_eq!(
        backend.fetches_waiting(),
        1,
        "acked while still queued for the permit"
    );

    blocker.lock.commit().await?;
    assert!(blocker.task.await??.is_empty());
    within("shutdown", sub.shutdown()).await?;
    assert_eq!(backend.fetches_waiting(), 0);
    db.close().await?;
    Ok(())
}
