//! Generations on Postgres: rotation reclaims drained partitions with TRUNCATE, moves what is
//! left without breaking a lease, never truncates under an uncommitted publish, works while
//! another session pins the xmin horizon, and the v3 schema upgrades in place.

mod support;

use std::time::Duration;

use anyhow::Result;
use postbox::pg::Rotation;
use postbox::prelude::*;
use postbox::sqlx::{self, Connection, PgConnection, PgPool};
use postbox::{FetchParams, Message, MessageState, PgBackend, RetryParams, TableName};
use support::{count, exec};

/// A backend whose generations rotate only when the test says so, at the first byte.
fn manual(backend: PgBackend) -> PgBackend {
    backend.rotation(Rotation::new().automatic(false).rotate_bytes(1))
}

/// Heap bytes of partition `slot` of `postbox`.
async fn partition_bytes(pool: &PgPool, slot: usize) -> i64 {
    sqlx::query_scalar("SELECT pg_relation_size($1::regclass)")
        .bind(format!("postbox_p{slot}"))
        .fetch_one(pool)
        .await
        .expect("pg_relation_size")
}

async fn publish(backend: &PgBackend, queue: &str, n: usize) -> Result<Vec<i64>> {
    let mut tx = backend.pool().begin().await?;
    let ids = backend
        .publish_batch(
            &mut tx,
            (0..n)
                .map(|i| Message::new(queue, format!("m{i}")))
                .collect(),
        )
        .await?;
    tx.commit().await?;
    Ok(ids)
}

#[tokio::test]
async fn a_drained_generation_is_truncated_and_publishes_move_on() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = manual(db.backend());
    publish(&backend, "q", 50).await?;
    let first = backend.rotate().await?;
    assert!(first.advanced, "{first:?}");
    assert_eq!(first.current, 1);
    assert!(first.truncated.is_empty(), "nothing drained yet: {first:?}");
    assert!(partition_bytes(db.pool(), 0).await > 0);

    let batch = backend.fetch(&FetchParams::new(["q"], 100)).await?;
    assert_eq!(batch.len(), 50);
    let leases: Vec<_> = batch.iter().map(|d| d.lease()).collect();
    assert_eq!(backend.ack_batch(&leases).await?.len(), 50);

    let second = backend.rotate().await?;
    assert_eq!(second.truncated, vec![0], "{second:?}");
    assert_eq!(second.moved, 0);
    assert_eq!(partition_bytes(db.pool(), 0).await, 0, "space given back");

    // New publishes go to generation 1.
    let ids = publish(&backend, "q", 3).await?;
    assert_eq!(count(db.pool(), "postbox_p1", "true").await, 3, "{ids:?}");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_reclaim_moves_what_is_left_and_leases_stay_fenced() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = manual(db.backend());
    let ids = publish(&backend, "q", 4).await?;
    assert!(backend.rotate().await?.advanced);
    // Leased, leased and lost, scheduled for a retry, and never fetched.
    let leased = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
    let lost = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
    let retried = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
    assert!(
        backend
            .retry(
                retried.lease(),
                RetryParams::new(Duration::from_secs(3600)).error("later")
            )
            .await?
    );
    exec(
        db.pool(),
        &format!(
            "UPDATE postbox SET acquired_at = now() - interval '1 hour' WHERE id = {}",
            lost.id
        ),
    )
    .await;
    let report = backend.rotate().await?;
    assert_eq!(report.truncated, vec![0], "{report:?}");
    assert_eq!(report.moved, 4);
    assert_eq!(count(db.pool(), "postbox_p0", "true").await, 0);
    assert_eq!(count(db.pool(), "postbox_p1", "true").await, 4);

    // The expired lease is taken again; its old holder can no longer settle it.
    let retaken = backend
        .fetch(&FetchParams::new(["q"], 10).lease_ttl(Duration::from_secs(60)))
        .await?;
    let retaken_ids: Vec<i64> = retaken.iter().map(|d| d.id).collect();
    assert_eq!(
        retaken_ids,
        vec![lost.id, ids[3]],
        "expired + never fetched"
    );
    assert!(!backend.ack(lost.lease()).await?, "a lost lease stays lost");
    assert!(backend.ack(leased.lease()).await?, "a moved lease is kept");
    let states: Vec<(i64, MessageState)> = backend
        .messages(Some("q"))
        .await?
        .iter()
        .map(|m| (m.id, m.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (lost.id, MessageState::Leased),
            (retried.id, MessageState::Scheduled),
            (ids[3], MessageState::Leased),
        ]
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_uncommitted_publish_blocks_the_truncation_of_its_generation() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = manual(db.backend());
    // A publish into generation 0 that has not committed while rotation moves on and then
    // tries to reclaim generation 0.
    let mut open = PgConnection::connect(db.url()).await?;
    let mut tx = open.begin().await?;
    let id = backend
        .publish(&mut tx, Message::new("q", "in flight"))
        .await?;
    let moved_on = backend.rotate().await?;
    assert!(moved_on.advanced, "{moved_on:?}");
    // Fails at once (NOWAIT) instead of waiting for the publisher.
    let blocked = tokio::time::timeout(support::wait(), backend.rotate())
        .await
        .expect("a rotation waited for the uncommitted publish instead of skipping it")?;
    assert_eq!(blocked.busy, vec![0], "{blocked:?}");
    assert!(blocked.truncated.is_empty(), "{blocked:?}");

    tx.commit().await?;
    let reclaimed = backend.rotate().await?;
    assert_eq!(reclaimed.truncated, vec![0], "{reclaimed:?}");
    assert_eq!(reclaimed.moved, 1, "the committed row is carried over");
    let got = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(got.iter().map(|d| d.id).collect::<Vec<_>>(), vec![id]);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_publish_leaves_nothing_to_move() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = manual(db.backend());
    let mut open = PgConnection::connect(db.url()).await?;
    let mut tx = open.begin().await?;
    backend.publish(&mut tx, Message::new("q", "never")).await?;
    assert!(backend.rotate().await?.advanced);
    tx.rollback().await?;
    let report = backend.rotate().await?;
    assert_eq!(
        (report.truncated.clone(), report.moved),
        (vec![0], 0),
        "{report:?}"
    );
    assert!(
        backend
            .fetch(&FetchParams::new(["q"], 10))
            .await?
            .is_empty()
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn rotation_reclaims_space_while_a_snapshot_pins_the_horizon() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = manual(db.backend());
    let mut holder = PgConnection::connect(db.url()).await?;
    exec_on(
        &mut holder,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1",
    )
    .await?;
    let mut truncations = 0;
    for _ in 0..3 {
        publish(&backend, "q", 200).await?;
        let batch = backend.fetch(&FetchParams::new(["q"], 500)).await?;
        assert_eq!(batch.len(), 200);
        let leases: Vec<_> = batch.iter().map(|d| d.lease()).collect();
        backend.ack_batch(&leases).await?;
        truncations += backend.rotate().await?.truncated.len();
    }
    // VACUUM could remove none of the dead rows (the snapshot is older); TRUNCATE did.
    let report = backend.rotate().await?;
    truncations += report.truncated.len();
    assert!(truncations >= 3, "{truncations} truncations");
    let sizes = [
        partition_bytes(db.pool(), 0).await,
        partition_bytes(db.pool(), 1).await,
        partition_bytes(db.pool(), 2).await,
    ];
    assert!(
        sizes.iter().filter(|b| **b == 0).count() >= 2,
        "generations reclaimed under the held snapshot: {sizes:?} {report:?}"
    );
    exec_on(&mut holder, "COMMIT").await?;
    db.close().await?;
    Ok(())
}

async fn exec_on(conn: &mut PgConnection, sql: &'static str) -> Result<()> {
    sqlx::raw_sql(sql).execute(conn).await?;
    Ok(())
}

/// Messages published under schema v3 (ready, delayed, retried, leased) survive the upgrade
/// with their ids, states and leases, and are each delivered once afterwards.
#[tokio::test]
async fn the_v3_schema_upgrades_in_place_without_losing_a_message() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let table = TableName::new("legacy_outbox")?;
    let backend =
        PgBackend::with_table(db.pool().clone(), table).rotation(Rotation::new().automatic(false));
    assert_eq!(backend.migrate_to(3).await?, vec![1, 2, 3]);
    let token = uuid::Uuid::new_v4();
    exec(
        db.pool(),
        &format!(
            "INSERT INTO legacy_outbox (queue, payload, correlation_id, next_attempt_at)
             VALUES ('q', 'ready', gen_random_uuid(), now() - interval '1 minute'),
                    ('q', 'delayed', gen_random_uuid(), now() + interval '1 hour');
             INSERT INTO legacy_outbox (queue, payload, correlation_id, next_attempt_at,
                                        attempts, last_error)
             VALUES ('q', 'retried', gen_random_uuid(), now() - interval '1 second', 1, 'boom');
             INSERT INTO legacy_outbox (queue, payload, correlation_id, deliveries,
                                        acquired_at, acquired_token)
             VALUES ('q', 'leased', gen_random_uuid(), 1, now(), '{token}');"
        ),
    )
    .await;
    let before = backend.messages(Some("q")).await?;
    assert_eq!(
        backend.migrate().await?,
        (4..=postbox::pg::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    backend.validate_schema().await?;
    let after = backend.messages(Some("q")).await?;
    let view = |ms: &[postbox::StoredMessage]| {
        ms.iter()
            .map(|m| (m.id, m.payload.clone(), m.state, m.attempts, m.deliveries))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&after), view(&before));
    let leased = after.iter().find(|m| m.payload == b"leased".as_slice());
    let leased_id = leased.map(|m| m.id).expect("leased row");

    // The lease taken before the upgrade still settles (fenced by its token).
    assert!(
        backend
            .ack(postbox::Lease {
                id: leased_id,
                token
            })
            .await?
    );
    let got = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    let payloads: Vec<&[u8]> = got.iter().map(|d| d.payload.as_slice()).collect();
    assert_eq!(payloads, vec![b"ready".as_slice(), b"retried".as_slice()]);
    let leases: Vec<_> = got.iter().map(|d| d.lease()).collect();
    assert_eq!(backend.ack_batch(&leases).await?.len(), 2);
    assert!(
        backend
            .fetch(&FetchParams::new(["q"], 10))
            .await?
            .is_empty()
    );
    assert_eq!(
        backend.messages(Some("q")).await?.len(),
        1,
        "the delayed one waits"
    );

    // Ids continue from the old sequence.
    let mut tx = db.pool().begin().await?;
    let new_id = backend.publish(&mut tx, Message::new("q", "new")).await?;
    tx.commit().await?;
    assert!(new_id > after.iter().map(|m| m.id).max().unwrap_or_default());
    db.close().await?;
    Ok(())
}

/// Leases taken under schema v4 settle through the outcome functions of v5 after the upgrade,
/// still fenced by their tokens, and every message is delivered once.
#[tokio::test]
async fn leases_taken_under_v4_settle_after_the_v5_upgrade() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let table = TableName::new("v4_outbox")?;
    let backend =
        PgBackend::with_table(db.pool().clone(), table).rotation(Rotation::new().automatic(false));
    assert_eq!(backend.migrate_to(4).await?, vec![1, 2, 3, 4]);
    let mut tx = db.pool().begin().await?;
    for i in 0..6 {
        backend
            .publish(&mut tx, Message::new("q", format!("m{i}")))
            .await?;
    }
    tx.commit().await?;
    let got = backend.fetch(&FetchParams::new(["q"], 5)).await?;
    assert_eq!(got.len(), 5);
    let leases: Vec<postbox::Lease> = got.iter().map(|d| d.lease()).collect();

    assert_eq!(
        backend.migrate().await?,
        (5..=postbox::pg::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    backend.validate_schema().await?;

    let stale = postbox::Lease {
        id: leases[0].id,
        token: uuid::Uuid::new_v4(),
    };
    assert!(
        !backend.ack(stale).await?,
        "a foreign token settles nothing"
    );
    assert!(backend.renew_lease(leases[0]).await?);
    assert!(backend.ack(leases[0]).await?);
    assert!(!backend.ack(leases[0]).await?, "acked once");
    assert!(
        backend
            .retry(leases[1], RetryParams::new(Duration::ZERO))
            .await?
    );
    assert!(backend.dead_letter(leases[2], "poison").await?);
    assert!(backend.release(leases[3]).await?);
    assert_eq!(backend.ack_batch(&leases[4..]).await?, vec![leases[4].id]);

    // What is left: the retried, the released and the never fetched message, once each.
    let again = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    let mut payloads: Vec<String> = again
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["m1", "m3", "m5"]);
    assert_eq!(backend.dead_letters(Some("q")).await?.len(), 1);
    db.close().await?;
    Ok(())
}
