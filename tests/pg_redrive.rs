//! Dead-letter redrive on real Postgres: what it wakes, and a subscriber picking a requeued
//! message up. The semantics (selection, history cleared, racing calls) are conformance cases.

mod support;

use anyhow::Result;
use postbox::prelude::*;
use postbox::runtime::SubscriberEvent;
use postbox::sqlx::postgres::PgListener;
use postbox::{
    DeadFilter, Delivery, FetchParams, HandlerError, Message, MessageId, PgBackend, Redrive,
    Subscriber, SubscriberOptions,
};
use support::{recv_n, until, wait};

/// Publishes one message on each of `queues` and dead-letters it; returns the ids.
async fn bury(backend: &PgBackend, queues: &[&str]) -> Result<Vec<MessageId>> {
    let mut ids = Vec::new();
    for queue in queues {
        let mut tx = backend.begin().await?;
        ids.push(backend.publish(&mut tx, Message::new(*queue, "x")).await?);
        backend.commit(tx).await?;
        let d = backend
            .fetch(&FetchParams::new([*queue], 1))
            .await?
            .remove(0);
        assert!(backend.dead_letter(d.lease(), "broken").await?);
    }
    Ok(ids)
}

#[tokio::test]
async fn a_requeue_wakes_each_queue_once_and_a_purge_wakes_none() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    bury(&backend, &["a", "a", "b", "c"]).await?;
    let mut listener = PgListener::connect_with(backend.pool()).await?;
    listener.listen(&backend.table().channel()).await?;

    assert_eq!(
        backend
            .purge_dead(&DeadFilter::all().queue("c"))
            .await?
            .len(),
        1
    );
    assert_eq!(backend.requeue_dead(&DeadFilter::all()).await?.len(), 3);
    // NOTIFY is delivered in commit order: everything the purge and the requeue sent comes
    // before the sentinel's.
    let mut tx = backend.begin().await?;
    backend
        .publish(&mut tx, Message::new("sentinel", ""))
        .await?;
    backend.commit(tx).await?;
    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(wait(), listener.recv()).await??;
        if n.payload() == "sentinel" {
            break;
        }
        seen.push(n.payload().to_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        ["a", "b"],
        "one wake-up per requeued queue, none for the purge"
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_subscriber_is_woken_by_a_requeue() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ids = bury(&backend, &["jobs"]).await?;
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |d: Delivery| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(d.id);
            Ok::<(), HandlerError>(())
        }
    };
    // Polling alone would not come back before the test's deadline: only the requeue's
    // notification can wake it in time.
    let idle = wait() * 5;
    let options = SubscriberOptions::new(["jobs"])
        .min_fetch_interval(idle)
        .max_fetch_interval(idle);
    let subscriber = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut events = subscriber.events();
    until(&mut events, "LISTEN", |e| {
        *e == SubscriberEvent::ListenerConnected
    })
    .await;
    until(&mut events, "idle", |e| *e == SubscriberEvent::Idle).await;
    assert_eq!(
        backend.requeue_dead(&DeadFilter::ids(ids.clone())).await?,
        ids
    );
    assert_eq!(recv_n(&mut handled, 1).await, ids);
    subscriber.shutdown().await?;
    assert!(
        backend.messages(None).await?.is_empty(),
        "handled and acked"
    );
    db.close().await?;
    Ok(())
}
