//! Queue depths on real Postgres: counted from the indexes, never by a sequential scan.

mod support;

use anyhow::Result;
use postbox::prelude::*;
use postbox::sqlx::{self, PgConnection};
use postbox::{Depth, FetchParams, Message};
use support::exec;

/// Sequential scans of `relation` counted by this session's current transaction.
async fn seq_scans(conn: &mut PgConnection, relation: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_stat_get_xact_numscans($1::regclass)")
            .bind(relation)
            .fetch_one(conn)
            .await?,
    )
}

/// With thousands of messages and fresh statistics (where counting everything would be
/// planned as a sequential scan), the depths function reads only indexes, and agrees with the
/// trait method.
#[tokio::test]
async fn depths_read_indexes_only() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    for queue in ["a", "b", "c"] {
        let mut tx = backend.begin().await?;
        backend
            .publish_batch(
                &mut tx,
                (0..1_000)
                    .map(|i| Message::new(queue, format!("{i}")))
                    .collect(),
            )
            .await?;
        backend.commit(tx).await?;
    }
    let leased = backend.fetch(&FetchParams::new(["a"], 300)).await?;
    for d in &leased[..100] {
        assert!(backend.dead_letter(d.lease(), "no").await?);
    }
    exec(db.pool(), "VACUUM ANALYZE postbox, postbox_dead").await;

    let mut conn = db.pool().acquire().await?;
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT queue, ready, scheduled, leased, dead FROM postbox_depths(NULL, NULL)",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut scans = Vec::new();
    for relation in ["postbox_p0", "postbox_p1", "postbox_p2", "postbox_dead"] {
        scans.push((relation, seq_scans(&mut conn, relation).await?));
    }
    sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
    assert_eq!(
        rows,
        vec![
            ("a".to_owned(), 700, 0, 200, 100),
            ("b".to_owned(), 1_000, 0, 0, 0),
            ("c".to_owned(), 1_000, 0, 0, 0),
        ]
    );
    assert!(
        scans.iter().all(|(_, n)| *n == 0),
        "sequential scans: {scans:?}"
    );
    let depths = backend.queue_depths(None).await?;
    let via_trait: Vec<_> = depths
        .iter()
        .map(|d| (d.queue.clone(), d.ready, d.scheduled, d.leased, d.dead))
        .collect();
    assert_eq!(via_trait, rows);
    db.close().await?;
    Ok(())
}
