//! Topics on real Postgres: what only a database shows (transactions committing out of id
//! order, a subscription created while a publish is in flight, an open transaction that
//! must not widen the scan). The semantics shared with the fake are in the conformance suite.

mod support;

use std::collections::BTreeSet;

use anyhow::Result;
use postbox::{
    Backend, Message, MessageId, PgBackend, Receive, Settlement, Subscribed, Topics, Unsubscribe,
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
    Ok(ids)
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
        .await?;
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
        .await?;
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
