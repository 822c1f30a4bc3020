//! Fenced outcomes against real Postgres: with the wrong token nothing changes.

mod support;

use std::time::Duration;

use anyhow::Result;
use postbox::prelude::*;
use postbox::sqlx::PgPool;
use postbox::{
    Delivery, FetchParams, HandlerError, Lease, Message, Outcome, PgBackend, RetryParams,
    RetryPolicy,
};
use support::{count, db_now, exec};

/// Publishes `n` messages on queue `q` and leases them all.
async fn leased(backend: &PgBackend, n: usize) -> Result<Vec<Delivery>> {
    let mut tx = backend.begin().await?;
    backend
        .publish_batch(
            &mut tx,
            (0..n).map(|i| Message::new("q", format!("{i}"))).collect(),
        )
        .await?;
    backend.commit(tx).await?;
    let got = backend.fetch(&FetchParams::new(["q"], 1000)).await?;
    assert_eq!(got.len(), n);
    Ok(got)
}

/// Every column of a row, as text, to compare before and after.
async fn snapshot(pool: &PgPool, id: i64) -> String {
    postbox::sqlx::query_scalar("SELECT row_to_json(p)::text FROM postbox p WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("snapshot")
        .unwrap_or_default()
}

fn wrong(lease: Lease) -> Lease {
    Lease {
        token: uuid::Uuid::new_v4(),
        ..lease
    }
}

#[tokio::test]
async fn every_outcome_with_the_wrong_token_changes_nothing_and_returns_false() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let d = leased(&backend, 1).await?.remove(0);
    let before = snapshot(db.pool(), d.id).await;
    let bad = wrong(d.lease());

    assert!(!backend.ack(bad).await?);
    assert_eq!(backend.ack_batch(&[bad]).await?, Vec::<i64>::new());
    assert!(
        !backend
            .retry(bad, RetryParams::new(Duration::ZERO).error("x"))
            .await?
    );
    assert!(!backend.dead_letter(bad, "x").await?);
    assert!(!backend.renew_lease(bad).await?);
    assert!(!backend.release(bad).await?);
    // A right token on the wrong id is just as powerless.
    assert!(
        !backend
            .ack(Lease {
                id: d.id + 1,
                token: d.token
            })
            .await?
    );

    assert_eq!(snapshot(db.pool(), d.id).await, before, "row untouched");
    assert_eq!(count(db.pool(), "postbox_dead", "true").await, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_stale_holder_cannot_settle_a_row_reclaimed_by_someone_else() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let stale = leased(&backend, 1).await?.remove(0);
    exec(
        db.pool(),
        "UPDATE postbox SET acquired_at = now() - interval '1 hour'",
    )
    .await;
    let current = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
    assert_eq!(current.id, stale.id);

    assert!(!backend.ack(stale.lease()).await?, "stale ack");
    assert!(
        !backend
            .retry(stale.lease(), RetryParams::new(Duration::ZERO))
            .await?
    );
    assert!(!backend.dead_letter(stale.lease(), "stale").await?);
    assert!(
        backend.ack(current.lease()).await?,
        "the current holder acks"
    );
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn ack_deletes_and_a_second_ack_reports_false() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let d = leased(&backend, 1).await?.remove(0);
    assert!(backend.ack(d.lease()).await?);
    assert!(!backend.ack(d.lease()).await?);
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn ack_batch_acks_exactly_the_leases_still_held() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ds = leased(&backend, 5).await?;
    let mut leases: Vec<Lease> = ds.iter().map(Delivery::lease).collect();
    leases[1] = wrong(leases[1]);
    let mut acked = backend.ack_batch(&leases).await?;
    acked.sort();
    assert_eq!(acked, [ds[0].id, ds[2].id, ds[3].id, ds[4].id]);
    assert_eq!(count(db.pool(), "postbox", "true").await, 1);
    assert_eq!(backend.ack_batch(&[]).await?, Vec::<i64>::new());
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn retry_reschedules_on_the_database_clock_and_clears_the_lease() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ds = leased(&backend, 2).await?;

    // Pinned clock: the delay is added to the statement's clock, not the worker's.
    let pinned = chrono::DateTime::parse_from_rfc3339("2001-02-03T04:05:06Z")?.to_utc();
    backend.set_now(Some(pinned));
    assert!(
        backend
            .retry(
                ds[0].lease(),
                RetryParams::new(Duration::from_secs(90)).error("smtp down")
            )
            .await?
    );
    backend.set_now(None);
    let (next, attempts, error, token): (
        chrono::DateTime<chrono::Utc>,
        i32,
        Option<String>,
        Option<uuid::Uuid>,
    ) = postbox::sqlx::query_as(
        "SELECT next_attempt_at, attempts, last_error, acquired_token FROM postbox WHERE id = $1",
    )
    .bind(ds[0].id)
    .fetch_one(db.pool())
    .await?;
    assert_eq!(next, pinned + chrono::Duration::seconds(90));
    assert_eq!(
        (attempts, error.as_deref(), token),
        (1, Some("smtp down"), None)
    );

    // Real clock: next_attempt_at lands within [db now before, db now after] + delay.
    let before = db_now(db.pool()).await;
    assert!(
        backend
            .retry(ds[1].lease(), RetryParams::new(Duration::from_secs(60)))
            .await?
    );
    let after = db_now(db.pool()).await;
    let next: chrono::DateTime<chrono::Utc> =
        postbox::sqlx::query_scalar("SELECT next_attempt_at FROM postbox WHERE id = $1")
            .bind(ds[1].id)
            .fetch_one(db.pool())
            .await?;
    let delay = chrono::Duration::seconds(60);
    assert!(
        next >= before + delay && next <= after + delay,
        "{before} <= {next} - 60s <= {after}"
    );

    // Rescheduled into the past (pinned clock): eligible again, with attempts carried over.
    exec(
        db.pool(),
        "UPDATE postbox SET next_attempt_at = now() - interval '1 second'",
    )
    .await;
    let again = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|d| d.attempts == 1 && d.deliveries == 2));
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn dead_letter_moves_the_row_with_its_reason_in_one_step() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let d = leased(&backend, 1).await?.remove(0);
    assert!(backend.dead_letter(d.lease(), "malformed payload").await?);
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    let (id, payload, reason, attempts, deliveries): (i64, Vec<u8>, String, i32, i32) =
        postbox::sqlx::query_as(
            "SELECT id, payload, reason, attempts, deliveries FROM postbox_dead",
        )
        .fetch_one(db.pool())
        .await?;
    assert_eq!(
        (id, payload.as_slice(), reason.as_str()),
        (d.id, &b"0"[..], "malformed payload")
    );
    assert_eq!(
        (attempts, deliveries),
        (1, 1),
        "the rejection counts as an outcome"
    );
    assert!(!backend.dead_letter(d.lease(), "again").await?);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn renew_restarts_the_lease_clock_and_release_gives_the_row_back() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let ds = leased(&backend, 2).await?;
    exec(
        db.pool(),
        "UPDATE postbox SET acquired_at = now() - interval '29 seconds'",
    )
    .await;
    assert!(backend.renew_lease(ds[0].lease()).await?);
    exec(
        db.pool(),
        "UPDATE postbox SET acquired_at = acquired_at - interval '2 seconds'",
    )
    .await;
    let reclaimed = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(
        reclaimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        [ds[1].id],
        "the renewed lease holds"
    );

    assert!(backend.release(ds[0].lease()).await?);
    let back = backend.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(back.len(), 1);
    assert_eq!(
        (back[0].id, back[0].deliveries, back[0].attempts),
        (ds[0].id, 1, 0),
        "a release is not a delivery"
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn fail_retries_through_the_policy_and_dead_letters_when_exhausted() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let policy = RetryPolicy::constant(Duration::ZERO).max_attempts(3);
    let error = HandlerError::retry("flaky");
    leased(&backend, 1).await?;
    exec(
        db.pool(),
        "UPDATE postbox SET acquired_token = NULL, acquired_at = NULL",
    )
    .await;

    for attempt in 1..=2 {
        let d = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
        assert_eq!(d.attempts, attempt - 1);
        let outcome = backend.fail(&d, &error, &policy).await?;
        assert_eq!(
            outcome,
            Outcome::Retried {
                delay: Duration::ZERO
            }
        );
    }
    let d = backend.fetch(&FetchParams::new(["q"], 1)).await?.remove(0);
    let outcome = backend.fail(&d, &error, &policy).await?;
    assert!(
        matches!(&outcome, Outcome::DeadLettered { reason } if reason.contains("exhausted after 3")),
        "{outcome:?}"
    );
    assert_eq!(count(db.pool(), "postbox", "true").await, 0);
    assert_eq!(
        count(
            db.pool(),
            "postbox_dead",
            "attempts = 3 AND last_error = 'flaky'"
        )
        .await,
        1
    );
    // Settling again with the old lease: lost, nothing changes.
    assert_eq!(backend.fail(&d, &error, &policy).await?, Outcome::LeaseLost);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_rejection_dead_letters_at_once() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let d = leased(&backend, 1).await?.remove(0);
    let outcome = backend
        .fail(
            &d,
            &HandlerError::reject("bad input"),
            &RetryPolicy::default(),
        )
        .await?;
    assert_eq!(
        outcome,
        Outcome::DeadLettered {
            reason: "rejected: bad input".into()
        }
    );
    assert_eq!(
        count(db.pool(), "postbox_dead", "reason = 'rejected: bad input'").await,
        1
    );
    db.close().await?;
    Ok(())
}
