//! The lease-based fetch against real Postgres.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use postbox::prelude::*;
use postbox::{Error, FetchParams, Message, PgBackend, RetryParams};
use support::{count, db_now, eventually, exec};

async fn publish(backend: &PgBackend, messages: Vec<Message>) -> Result<Vec<i64>> {
    let mut tx = backend.begin().await?;
    let ids = backend.publish_batch(&mut tx, messages).await?;
    backend.commit(tx).await?;
    Ok(ids)
}

fn ids(deliveries: &[postbox::Delivery]) -> Vec<i64> {
    deliveries.iter().map(|d| d.id).collect()
}

#[tokio::test]
async fn fetch_claims_ready_rows_of_its_queues_in_order_within_the_limit() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let now = db_now(db.pool()).await;
    let published = publish(
        &backend,
        vec![
            Message::new("a", "later").not_before(now - chrono::Duration::seconds(10)),
            Message::new("a", "earliest").not_before(now - chrono::Duration::seconds(60)),
            Message::new("b", "other queue"),
            Message::new("a", "future").delay(Duration::from_secs(3600)),
            Message::new("a", "now-1"),
            Message::new("a", "now-2"),
        ],
    )
    .await?;
    let [later, earliest, other, future, now1, now2] = published[..] else {
        panic!("six ids")
    };

    let first = backend.fetch(&FetchParams::new(["a"], 2)).await?;
    assert_eq!(
        ids(&first),
        [earliest, later],
        "(next_attempt_at, id) order, limited"
    );
    assert_eq!(
        first[0].token, first[1].token,
        "one token per fetched batch"
    );
    assert_eq!(first[0].deliveries, 1);
    assert_eq!(first[0].attempts, 0);
    assert_eq!(first[0].payload, b"earliest");

    let second = backend.fetch(&FetchParams::new(["a"], 10)).await?;
    assert_eq!(
        ids(&second),
        [now1, now2],
        "same next_attempt_at: id order; future skipped"
    );
    assert_ne!(second[0].token, first[0].token);

    assert!(
        backend
            .fetch(&FetchParams::new(["a"], 10))
            .await?
            .is_empty()
    );
    let b = backend.fetch(&FetchParams::new(["b", "c"], 10)).await?;
    assert_eq!(ids(&b), [other]);
    assert_eq!(
        count(
            db.pool(),
            "postbox",
            &format!("id = {future} AND acquired_token IS NULL")
        )
        .await,
        1
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn fetch_over_several_queues_merges_them_in_order() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let now = db_now(db.pool()).await;
    let at = |s: i64| now - chrono::Duration::seconds(s);
    let published = publish(
        &backend,
        vec![
            Message::new("x", "").not_before(at(5)),
            Message::new("y", "").not_before(at(50)),
            Message::new("x", "").not_before(at(40)),
            Message::new("y", "").not_before(at(1)),
        ],
    )
    .await?;
    let got = backend.fetch(&FetchParams::new(["x", "y"], 3)).await?;
    assert_eq!(ids(&got), [published[1], published[2], published[0]]);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_with_a_new_token_and_a_fresh_one_is_left_alone() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    publish(
        &backend,
        vec![Message::new("q", "1"), Message::new("q", "2")],
    )
    .await?;
    let ttl = Duration::from_secs(30);

    let first = backend
        .fetch(&FetchParams::new(["q"], 1).lease_ttl(ttl))
        .await?;
    let fresh = backend
        .fetch(&FetchParams::new(["q"], 1).lease_ttl(ttl))
        .await?;
    assert_eq!(first.len(), 1);
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0].id, first[0].id);
    // Age the first lease past the TTL; the second keeps its fresh lease.
    exec(
        db.pool(),
        &format!(
            "UPDATE postbox SET acquired_at = now() - interval '31 seconds' WHERE id = {}",
            first[0].id
        ),
    )
    .await;

    let reclaimed = backend
        .fetch(&FetchParams::new(["q"], 10).lease_ttl(ttl))
        .await?;
    assert_eq!(
        ids(&reclaimed),
        [first[0].id],
        "only the expired lease comes back"
    );
    assert_ne!(reclaimed[0].token, first[0].token, "under a new token");
    assert_eq!(reclaimed[0].deliveries, 2);
    assert_eq!(reclaimed[0].first_attempt_at, first[0].first_attempt_at);
    assert!(reclaimed[0].acquired_at > first[0].acquired_at);

    assert!(
        backend
            .fetch(&FetchParams::new(["q"], 10).lease_ttl(ttl))
            .await?
            .is_empty()
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn pinned_clock_expires_leases_without_waiting() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    publish(&backend, vec![Message::new("q", "1")]).await?;
    let first = backend.fetch(&FetchParams::new(["q"], 1)).await?;

    backend.set_now(Some(
        db_now(db.pool()).await + chrono::Duration::seconds(29),
    ));
    assert!(
        backend.fetch(&FetchParams::new(["q"], 1)).await?.is_empty(),
        "29 s < 30 s TTL"
    );
    backend.set_now(Some(
        db_now(db.pool()).await + chrono::Duration::seconds(31),
    ));
    let again = backend.fetch(&FetchParams::new(["q"], 1)).await?;
    assert_eq!(ids(&again), ids(&first));
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn two_concurrent_fetches_over_200_rows_never_share_a_row() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let published = publish(
        &backend,
        (0..200)
            .map(|i| Message::new("q", format!("{i}")))
            .collect(),
    )
    .await?;

    let fetcher = |backend: PgBackend| async move {
        let mut got = Vec::new();
        loop {
            let batch = backend.fetch(&FetchParams::new(["q"], 7)).await?;
            if batch.is_empty() {
                return Ok::<_, Error>(got);
            }
            got.extend(ids(&batch));
        }
    };
    let (a, b) = tokio::try_join!(
        tokio::spawn(fetcher(backend.clone())),
        tokio::spawn(fetcher(backend.clone()))
    )?;
    let (a, b) = (a?, b?);
    let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a row was fetched twice");
    all.sort();
    assert_eq!(all, published, "every row fetched exactly once");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn max_deliveries_dead_letters_a_crash_looping_row_instead_of_leasing_it() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let [id] = publish(&backend, vec![Message::new("q", "poison")]).await?[..] else {
        panic!("one id")
    };
    let params = FetchParams::new(["q"], 1)
        .max_deliveries(2)
        .lease_ttl(Duration::from_secs(1));
    for delivery in 1..=2 {
        let got = backend.fetch(&params).await?;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].deliveries, delivery);
        // The handler "crashes": the lease just expires.
        exec(
            db.pool(),
            "UPDATE postbox SET acquired_at = now() - interval '1 minute'",
        )
        .await;
    }
    assert!(
        backend.fetch(&params).await?.is_empty(),
        "not leased a third time"
    );
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    let (dead_id, reason, deliveries): (i64, String, i32) =
        postbox::sqlx::query_as("SELECT id, reason, deliveries FROM postbox_dead")
            .fetch_one(db.pool())
            .await?;
    assert_eq!((dead_id, deliveries), (id, 2));
    assert!(reason.contains("max_deliveries"), "{reason}");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn bad_fetch_parameters_are_rejected() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let none: [&str; 0] = [];
    for params in [
        FetchParams::new(none, 1),
        FetchParams::new(["q"], 0),
        FetchParams::new([""], 1),
    ] {
        let err = backend.fetch(&params).await.expect_err("rejected");
        assert!(
            matches!(err, Error::InvalidArgument(_) | Error::InvalidQueue { .. }),
            "{err}"
        );
    }
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn both_fetch_branches_use_their_partial_index_on_a_large_table() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    exec(
        db.pool(),
        "INSERT INTO postbox (queue, payload, correlation_id, next_attempt_at)
         SELECT 'q' || (i % 4), '\\x00', gen_random_uuid(), now() - (i || ' seconds')::interval
         FROM generate_series(1, 20000) AS i;
         UPDATE postbox SET acquired_token = gen_random_uuid(), acquired_at = now()
         WHERE id % 50 = 0;
         ANALYZE postbox;",
    )
    .await;
    let plan = backend.explain_fetch(&FetchParams::new(["q1"], 10)).await?;
    // The indexes are declared on the partitioned table, and each partition has its own
    // piece; the rows above are all in generation 0 (the others are empty, and a sequential
    // scan of an empty partition is the right plan).
    let pieces: Vec<String> = postbox::sqlx::query_scalar(
        "SELECT relid::regclass::text FROM pg_partition_tree('postbox_pending_idx') \
         UNION ALL \
         SELECT relid::regclass::text FROM pg_partition_tree('postbox_lease_idx')",
    )
    .fetch_all(db.pool())
    .await?;
    assert!(
        pieces
            .iter()
            .any(|p| p == "postbox_p0_queue_next_attempt_at_id_idx")
            && pieces
                .iter()
                .any(|p| p == "postbox_p0_queue_acquired_at_idx"),
        "{pieces:?}"
    );
    assert!(
        plan.contains("Index Scan using postbox_p0_queue_next_attempt_at_id_idx"),
        "ready branch reads generation 0's piece of postbox_pending_idx:\n{plan}"
    );
    assert!(
        plan.contains("Index Scan using postbox_p0_queue_acquired_at_idx"),
        "expired-lease branch reads generation 0's piece of postbox_lease_idx:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on postbox_p0"),
        "no sequential scan:\n{plan}"
    );
    db.close().await?;
    Ok(())
}

/// With `max_concurrent_fetches(1)`, a second fetch waits in the process while the first one
/// is stuck in the database (on a member row the test holds locked), although nothing in the
/// database would stop it; a cancelled wait is uncounted; both complete once the lock goes.
#[tokio::test]
async fn capped_fetches_beyond_the_cap_wait_in_the_process() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db
        .backend()
        .max_concurrent_fetches(std::num::NonZeroUsize::MIN);
    assert_eq!(backend.fetches_waiting(), 0);
    let published = publish(
        &backend,
        (0..10).map(|i| Message::new("q", format!("{i}"))).collect(),
    )
    .await?;

    let first = support::stuck_receive(db.pool(), &backend, "q", 5).await;
    eventually("the first fetch to wait on the row lock", || async {
        count_lock_waits(&db).await == 1
    })
    .await;

    let spawn_fetch = || {
        let backend = backend.clone();
        tokio::spawn(async move { backend.fetch(&FetchParams::new(["q"], 5)).await })
    };
    let second = spawn_fetch();
    eventually("the second fetch to queue for a permit", || async {
        backend.fetches_waiting() == 1
    })
    .await;
    let third = spawn_fetch();
    eventually("a third waiter", || async {
        backend.fetches_waiting() == 2
    })
    .await;
    third.abort();
    eventually("the cancelled waiter to be uncounted", || async {
        backend.fetches_waiting() == 1
    })
    .await;
    assert!(!second.is_finished(), "the second fetch ran past the cap");
    assert_eq!(
        count_lock_waits(&db).await,
        1,
        "only the first fetch reached the database"
    );

    first.lock.commit().await?;
    let (first, second) = (first.task.await??, second.await??);
    let mut got: Vec<i64> = ids(&first).into_iter().chain(ids(&second)).collect();
    got.sort();
    assert_eq!(got, published, "the two fetches split the ten rows");
    assert_eq!(backend.fetches_waiting(), 0);
    db.close().await?;
    Ok(())
}

/// Statements of this database waiting on a heavyweight lock.
async fn count_lock_waits(db: &postbox::testkit::PgFixture) -> i64 {
    postbox::sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db.pool())
    .await
    .expect("pg_stat_activity")
}

/// Sequential scans of `generation` counted by this session's current transaction.
async fn seq_scans_in_this_transaction(
    conn: &mut postbox::sqlx::PgConnection,
    generation: &str,
) -> i64 {
    postbox::sqlx::query_scalar("SELECT pg_stat_get_xact_numscans($1::regclass)")
        .bind(generation)
        .fetch_one(conn)
        .await
        .expect("scan count")
}

/// A plan cached while the outbox was empty (a `VACUUM` of a drained generation records it as
/// empty) must not read a full generation by sequential scan later: the runtime's fetch
/// connection plans without sequential scans, and the batch ack is planned on every call.
/// (The single-row outcomes keep the hazard: see `docs/design/storage.md`, *Plans*.)
#[tokio::test]
async fn plans_made_while_the_outbox_was_empty_stay_index_scans_once_it_fills() -> Result<()> {
    use postbox::sqlx::Connection;

    let db = postbox::testkit::postgres().await?;
    // One connection, so the outcomes below always run on the session whose plans they
    // cached.
    let pool = postbox::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(db.url())
        .await?;
    let backend = PgBackend::new(pool.clone());
    exec(&pool, "VACUUM ANALYZE postbox").await;
    let engine = backend.pg_engine();
    let mut conn = engine.connect().await?;
    let params = FetchParams::new(["q"], 50);
    for _ in 0..8 {
        assert!(engine.fetch(&mut conn, &params).await?.is_empty());
    }
    // Eight acks of nothing: a prepared statement would have switched to a generic plan.
    let nobody = postbox::Lease {
        id: 1,
        token: uuid::Uuid::new_v4(),
    };
    for _ in 0..8 {
        assert!(backend.ack_batch(&[nobody]).await?.is_empty());
        // The single-row outcomes too: each would have a generic plan by now.
        assert!(!backend.ack(nobody).await?);
        assert!(
            !backend
                .retry(nobody, RetryParams::new(Duration::ZERO))
                .await?
        );
        assert!(!backend.dead_letter(nobody, "nobody").await?);
        assert!(!backend.renew_lease(nobody).await?);
        assert!(!backend.release(nobody).await?);
    }

    publish(
        &backend,
        (0..20_000)
            .map(|i| Message::new("q", i.to_string()))
            .collect(),
    )
    .await?;
    // The generation holding the rows (the empty ones may be scanned: they are empty).
    let generation: String =
        postbox::sqlx::query_scalar("SELECT tableoid::regclass::text FROM postbox LIMIT 1")
            .fetch_one(&pool)
            .await?;
    postbox::sqlx::raw_sql("BEGIN").execute(&mut conn).await?;
    let fetched = engine.fetch(&mut conn, &params).await?;
    let fetch_scans = seq_scans_in_this_transaction(&mut conn, &generation).await;
    postbox::sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
    assert_eq!(fetched.len(), 50);
    assert_eq!(fetch_scans, 0, "the cached fetch plan scanned a generation");

    // The outcomes run on the pool's only connection, outside any transaction of ours, so
    // count their scans in pg_stat_user_tables after forcing that session to report.
    let scans = |pool: postbox::sqlx::PgPool, generation: String| async move {
        postbox::sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
            .execute(&pool)
            .await
            .expect("flush");
        let mut conn = pool.acquire().await.expect("connection");
        postbox::sqlx::raw_sql("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .expect("clear");
        postbox::sqlx::query_scalar::<_, i64>(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = $1::regclass",
        )
        .bind(generation)
        .fetch_one(&mut *conn)
        .await
        .expect("scans")
    };
    let before = scans(pool.clone(), generation.clone()).await;
    let leases: Vec<_> = fetched.iter().map(postbox::Delivery::lease).collect();
    assert_eq!(backend.ack_batch(&leases[5..]).await?.len(), 45);
    let after = scans(pool.clone(), generation.clone()).await;
    assert_eq!(after - before, 0, "the batch ack scanned a generation");

    // Each single-row outcome once on a row of the full generation, on the session whose
    // plans were made while it was empty.
    let before = scans(pool.clone(), generation.clone()).await;
    assert!(backend.renew_lease(leases[0]).await?, "renew");
    assert!(backend.ack(leases[0]).await?, "ack");
    assert!(
        backend
            .retry(leases[1], RetryParams::new(Duration::from_secs(60)))
            .await?,
        "retry"
    );
    assert!(backend.dead_letter(leases[2], "test").await?, "dead_letter");
    assert!(backend.release(leases[3]).await?, "release");
    let after = scans(pool.clone(), generation).await;
    assert_eq!(
        after - before,
        0,
        "a single-row outcome scanned a generation (its plan was made while it was empty)"
    );
    conn.close().await?;
    Ok(())
}
