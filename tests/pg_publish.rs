//! Publishing in the caller's transaction, against real Postgres.

mod support;

use std::time::Duration;

use anyhow::Result;
use postbox::prelude::*;
use postbox::sqlx::postgres::PgListener;
use postbox::{Error, Message, PgBackend};
use support::{count, db_now, wait};

/// Receives notifications on `listener` until one with payload `until`; returns the payloads
/// received before it.
async fn notifications_until(listener: &mut PgListener, until: &str) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(wait(), listener.recv()).await??;
        if n.payload() == until {
            return Ok(seen);
        }
        seen.push(n.payload().to_owned());
    }
}

/// Commits a publish on the `sentinel` queue: since NOTIFY is delivered in commit order, every
/// notification of earlier commits arrives before the sentinel's.
async fn commit_sentinel(backend: &PgBackend) -> Result<()> {
    let mut tx = backend.begin().await?;
    backend
        .publish(&mut tx, Message::new("sentinel", ""))
        .await?;
    backend.commit(tx).await?;
    Ok(())
}

async fn listen(backend: &PgBackend) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(backend.pool()).await?;
    listener.listen(&backend.table().channel()).await?;
    Ok(listener)
}

#[tokio::test]
async fn rolled_back_publish_leaves_no_row_and_no_notification() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut listener = listen(&backend).await?;

    let mut tx = backend.begin().await?;
    backend
        .publish(&mut tx, Message::new("emails", "x"))
        .await?;
    backend
        .publish_batch(
            &mut tx,
            vec![Message::new("emails", "y"), Message::new("sms", "z")],
        )
        .await?;
    backend.rollback(tx).await?;

    // A dropped transaction rolls back too.
    {
        let mut tx = db.pool().begin().await?;
        backend
            .publish(&mut tx, Message::new("emails", "dropped"))
            .await?;
    }

    commit_sentinel(&backend).await?;
    assert_eq!(
        notifications_until(&mut listener, "sentinel").await?,
        Vec::<String>::new()
    );
    assert_eq!(count(db.pool(), "postbox", "queue <> 'sentinel'").await, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn committed_publish_writes_the_row_and_exactly_one_notification() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut listener = listen(&backend).await?;

    let mut tx = db.pool().begin().await?;
    let id = backend
        .publish(&mut tx, Message::new("emails", "hello"))
        .await?;
    // Not visible before commit.
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    tx.commit().await?;

    commit_sentinel(&backend).await?;
    assert_eq!(
        notifications_until(&mut listener, "sentinel").await?,
        ["emails"]
    );
    let (queue, payload): (String, Vec<u8>) =
        postbox::sqlx::query_as("SELECT queue, payload FROM postbox WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await?;
    assert_eq!(
        (queue.as_str(), payload.as_slice()),
        ("emails", &b"hello"[..])
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn batch_is_one_insert_with_one_notification_per_distinct_queue() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut listener = listen(&backend).await?;

    let messages: Vec<Message> = (0..10)
        .map(|i| Message::new(if i % 3 == 0 { "b" } else { "a" }, format!("m{i}")))
        .collect();
    let mut tx = backend.begin().await?;
    let ids = backend.publish_batch(&mut tx, messages).await?;
    backend.commit(tx).await?;

    assert_eq!(ids.len(), 10);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids ascend in input order: {ids:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let payload: Vec<u8> =
            postbox::sqlx::query_scalar("SELECT payload FROM postbox WHERE id = $1")
                .bind(id)
                .fetch_one(db.pool())
                .await?;
        assert_eq!(
            payload,
            format!("m{i}").into_bytes(),
            "id {id} holds message {i}"
        );
    }
    commit_sentinel(&backend).await?;
    let mut seen = notifications_until(&mut listener, "sentinel").await?;
    seen.sort();
    assert_eq!(seen, ["a", "b"]);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn empty_batch_is_a_no_op_without_notification() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut listener = listen(&backend).await?;

    let mut tx = backend.begin().await?;
    assert_eq!(
        backend.publish_batch(&mut tx, Vec::new()).await?,
        Vec::<i64>::new()
    );
    backend.commit(tx).await?;

    commit_sentinel(&backend).await?;
    assert_eq!(
        notifications_until(&mut listener, "sentinel").await?,
        Vec::<String>::new()
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn bad_queue_names_are_rejected_before_anything_is_written() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut tx = backend.begin().await?;
    for bad in [String::new(), "q".repeat(256), "nul\0byte".into()] {
        let err = backend
            .publish(&mut tx, Message::new(bad.clone(), "x"))
            .await
            .expect_err("rejected");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
        let err = backend
            .publish_batch(
                &mut tx,
                vec![Message::new("fine", "x"), Message::new(bad, "y")],
            )
            .await
            .expect_err("rejected");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
    }
    // The transaction is still usable: validation happened before any statement.
    backend.publish(&mut tx, Message::new("fine", "ok")).await?;
    backend.commit(tx).await?;
    assert_eq!(count(db.pool(), "postbox", "true").await, 1);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn headers_correlation_id_and_delay_are_stored() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let explicit = uuid::Uuid::new_v4();
    let before = db_now(db.pool()).await;
    let at = before + chrono::Duration::hours(2);

    let mut tx = backend.begin().await?;
    let a = backend
        .publish(
            &mut tx,
            Message::new("q", "a")
                .header("tenant", "acme")
                .correlation_id(explicit),
        )
        .await?;
    let ids = backend
        .publish_batch(
            &mut tx,
            vec![
                Message::new("q", "b").delay(Duration::from_secs(60)),
                Message::new("q", "c").not_before(at),
                Message::new("q", "d").correlation_id(explicit),
            ],
        )
        .await?;
    backend.commit(tx).await?;

    let row = |id: i64| {
        postbox::sqlx::query_as::<
            _,
            (
                Option<serde_json::Value>,
                uuid::Uuid,
                chrono::DateTime<chrono::Utc>,
                chrono::DateTime<chrono::Utc>,
            ),
        >(
            "SELECT headers, correlation_id, created_at, next_attempt_at FROM postbox WHERE id = $1"
        )
        .bind(id)
        .fetch_one(db.pool())
    };
    let (headers, corr, created, next) = row(a).await?;
    assert_eq!(headers, Some(serde_json::json!({"tenant": "acme"})));
    assert_eq!(corr, explicit, "an explicit correlation id wins");
    assert_eq!(created, next, "eligible at once");

    let (headers, corr_b, created, next) = row(ids[0]).await?;
    assert_eq!(headers, None);
    assert_ne!(corr_b, explicit, "a missing correlation id is generated");
    assert_eq!(
        next - created,
        chrono::Duration::seconds(60),
        "delay on the database clock"
    );

    let (_, corr_c, _, next) = row(ids[1]).await?;
    assert_eq!(next, at);
    assert_ne!(corr_c, corr_b, "each generated id is fresh");
    assert_eq!(row(ids[2]).await?.1, explicit);
    db.close().await?;
    Ok(())
}
