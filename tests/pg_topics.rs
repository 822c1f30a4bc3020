//! Topics on real Postgres: what only a database shows (transactions committing out of id
//! order, a subscription created while a publish is in flight, an open transaction that
//! must not widen the scan). The semantics shared with the fake are in the conformance suite.

mod support;

use std::collections::BTreeSet;

use anyhow::Result;
use postbox::{
    Backend, Message, MessageId, PgBackend, Published, Receive, Settlement, Subscribed, Topics,
    Unsubscribe,
};

async fn publish(backend: &PgBackend, topic: &str, n: usize) -> Result<Vec<MessageId>> {
    let mut tx = backend.begin().await?;
    let ids = backend
        .publish_to_topics(
            &mut tx,
            (0..n).map(|i| Message::new(topic, i.to_string())).collect(),
        )
        .await?;
    backend.commit(tx).await?;
    Ok(ids.into_iter().map(Published::id).collect())
}

/// Receives everything the subscription has now, acking each batch; returns the ids in
/// order of receipt.
async fn drain(backend: &PgBackend, subscription: &str) -> Result<Vec<MessageId>> {
    let mut seen = Vec::new();
    loop {
        let got = backend.receive(&Receive::new(subscription, 7)).await?;
        if got.is_empty() {
            return Ok(seen);
        }
        let leases: Vec<_> = got.iter().map(|d| d.lease()).collect();
        assert_eq!(
            backend.settle(&leases, Settlement::Ack).await?.len(),
            got.len()
        );
        seen.extend(got.iter().map(|d| d.id));
    }
}

#[tokio::test]
async fn transactions_committing_out_of_id_order_are_each_received_once_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    assert_eq!(backend.subscribe("t", "s").await?, Subscribed::New);
    assert_eq!(backend.subscribe("t", "s").await?, Subscribed::Existing);

    // `early` takes its ids (and its transaction id) first but commits last.
    let mut early = backend.begin().await?;
    let early_ids = backend
        .publish_to_topics(&mut early, vec![Message::new("t", "early")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    let later = publish(&backend, "t", 20).await?;
    let first = drain(&backend, "s").await?;
    assert_eq!(first, later, "the committed messages, in publish order");
    backend.commit(early).await?;
    let second = drain(&backend, "s").await?;
    assert_eq!(
        second, early_ids,
        "the late commit is received, not skipped"
    );
    assert!(drain(&backend, "s").await?.is_empty());
    let info = backend.subscriptions(Some("t")).await?;
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].backlog, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_publish_in_flight_while_a_subscription_is_created_is_received_by_it_postgres()
-> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let before = publish(&backend, "t", 3).await?;
    let mut in_flight = backend.begin().await?;
    let flying = backend
        .publish_to_topics(&mut in_flight, vec![Message::new("t", "flying")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    backend.subscribe("t", "late").await?;
    let after = publish(&backend, "t", 2).await?;
    backend.commit(in_flight).await?;
    let got: BTreeSet<MessageId> = drain(&backend, "late").await?.into_iter().collect();
    let want: BTreeSet<MessageId> = flying.iter().chain(&after).copied().collect();
    assert_eq!(
        got, want,
        "committed after creation: yes; before ({before:?}): no"
    );
    assert!(backend.unsubscribe("late", Unsubscribe::IfDrained).await?);
    assert!(!backend.unsubscribe("late", Unsubscribe::Discard).await?);
    db.close().await?;
    Ok(())
}

/// Heap bytes of the topic log's partitions, by slot.
async fn log_bytes(db: &postbox::testkit::PgFixture) -> Result<Vec<i64>> {
    Ok(postbox::sqlx::query_scalar(
        "SELECT ARRAY[pg_relation_size('postbox_log_p0'), pg_relation_size('postbox_log_p1'), \
         pg_relation_size('postbox_log_p2')]",
    )
    .fetch_one(db.pool())
    .await?)
}

/// A backend that rotates the log at every call (no size or age threshold), by hand.
fn rotating(db: &postbox::testkit::PgFixture) -> PgBackend {
    db.backend().rotation(
        postbox::Rotation::new()
            .automatic(false)
            .rotate_bytes(0)
            .max_age(std::time::Duration::ZERO),
    )
}

#[tokio::test]
async fn the_log_gives_its_space_back_once_every_subscription_has_passed_it_postgres() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    backend.subscribe("t", "fast").await?;
    backend.subscribe("t", "slow").await?;
    let published = publish(&backend, "t", 500).await?;
    assert!(backend.rotate_topics().await?.advanced, "publishes move on");
    assert_eq!(drain(&backend, "fast").await?, published);

    // `slow` has not received anything: its generation stays.
    for _ in 0..3 {
        let report = backend.rotate_topics().await?;
        assert!(report.truncated.is_empty(), "{report:?}");
    }
    assert!(log_bytes(&db).await?.iter().any(|b| *b > 0));

    // `slow` receives everything but settles nothing yet: its batch still refers to the rows.
    let held = backend.receive(&Receive::new("slow", 1_000)).await?;
    assert_eq!(held.len(), 500);
    let report = backend.rotate_topics().await?;
    assert!(
        report.truncated.is_empty(),
        "an unsettled batch keeps it: {report:?}"
    );

    // Settled: the generation is truncated and the log is empty on disk.
    let leases: Vec<_> = held.iter().map(|d| d.lease()).collect();
    assert_eq!(backend.settle(&leases, Settlement::Ack).await?.len(), 500);
    let mut truncated = 0;
    for _ in 0..3 {
        truncated += backend.rotate_topics().await?.truncated.len();
    }
    assert!(truncated > 0);
    assert_eq!(log_bytes(&db).await?, vec![0, 0, 0]);
    assert!(drain(&backend, "slow").await?.is_empty());
    assert!(drain(&backend, "fast").await?.is_empty());
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_uncommitted_publish_into_an_old_generation_survives_its_rotation_postgres() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    backend.subscribe("t", "s").await?;
    // The publish reads the current generation, then the log moves on before it commits.
    let mut in_flight = backend.begin().await?;
    let late = backend
        .publish_to_topics(&mut in_flight, vec![Message::new("t", "late")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    let first = publish(&backend, "t", 3).await?;
    assert!(backend.rotate_topics().await?.advanced);
    assert_eq!(drain(&backend, "s").await?, first);
    for _ in 0..3 {
        let report = backend.rotate_topics().await?;
        assert!(
            report.truncated.is_empty(),
            "the writer holds a lock: {report:?}"
        );
    }
    backend.commit(in_flight).await?;
    // Committed now, and not received yet: still needed.
    let report = backend.rotate_topics().await?;
    assert!(report.truncated.is_empty(), "{report:?}");
    assert_eq!(drain(&backend, "s").await?, late);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_topic_nobody_subscribes_is_reclaimed_at_once_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    publish(&backend, "nobody", 200).await?;
    assert!(backend.rotate_topics().await?.advanced);
    let mut truncated = 0;
    for _ in 0..3 {
        truncated += backend.rotate_topics().await?.truncated.len();
    }
    assert!(truncated > 0);
    assert_eq!(log_bytes(&db).await?, vec![0, 0, 0]);
    db.close().await?;
    Ok(())
}
