//! postbox through PgBouncer, in transaction mode (`PgBackend::transaction_pooler`) and in
//! session mode (default settings): publish, fetch, every outcome, cooperative members, the
//! journal and a `Subscriber`.
//!
//! Needs a PgBouncer in front of the test server: `.ci/run` starts two (transaction and
//! session mode) and sets `POSTBOX_TEST_PGBOUNCER_TX` and `POSTBOX_TEST_PGBOUNCER_SESSION`
//! to their base URLs (`postgres://user@host:port`); the fixture's database name is
//! appended. Without them these tests say so and pass: `cargo test --workspace` on a machine
//! without PgBouncer runs everything else.

mod support;

use std::collections::HashSet;

use anyhow::Result;
use postbox::coop::{CoopReceive, Unregister};
use postbox::journal::{BatchedJournalWriter, TailOptions, WriterOptions, snapshot_and_tail};
use postbox::pg::Rotation;
use postbox::prelude::*;
use postbox::sqlx::postgres::PgPoolOptions;
use postbox::testkit::{PgFixture, within};
use postbox::{
    Delivery, FetchParams, HandlerError, Member, Message, PgBackend, RetryParams, Subscriber,
    SubscriberOptions,
};

/// The base URL of the PgBouncer for `variable`, or `None` (and a note) when it is unset.
fn bouncer(variable: &str) -> Option<String> {
    let url = std::env::var(variable).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: set {variable} to a PgBouncer in front of the test server");
    }
    url
}

/// A backend on the fixture's database through the PgBouncer at `base`.
async fn through(base: &str, db: &PgFixture, transaction_mode: bool) -> Result<PgBackend> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&format!("{}/{}", base.trim_end_matches('/'), db.database()))
        .await?;
    let backend = PgBackend::new(pool).rotation(Rotation::new().automatic(false));
    Ok(if transaction_mode {
        backend.transaction_pooler()
    } else {
        backend
    })
}

fn payload(n: i64) -> postbox::journal::EventPayload {
    let mut map = serde_json::Map::new();
    map.insert("n".into(), n.into());
    map
}

/// Everything a service does, once, through the pooler.
async fn every_path(backend: PgBackend) -> Result<()> {
    // Publish, batch and single, in the caller's transaction.
    let mut tx = backend.begin().await?;
    let mut published: HashSet<i64> = backend
        .publish_batch(
            &mut tx,
            (0..300).map(|i| Message::new("q", i.to_string())).collect(),
        )
        .await?
        .into_iter()
        .collect();
    published.insert(backend.publish(&mut tx, Message::new("q", "one")).await?);
    backend.commit(tx).await?;

    // Statements from every pool connection at once: the pooler hands its server sessions
    // around between them, so each statement must keep one for its whole exchange (sqlx
    // parses and binds in two, and Postgres names an unnamed statement per session).
    let calls = (0..64).map(|i| {
        let backend = backend.clone();
        async move {
            if i % 2 == 0 {
                backend.messages(Some("q")).await.map(|m| m.len())
            } else {
                backend.dead_letters(Some("q")).await.map(|d| d.len() + 301)
            }
        }
    });
    for stored in futures_util::future::try_join_all(calls).await? {
        assert_eq!(stored, 301);
    }

    // Fetch and every outcome.
    let got = backend.fetch(&FetchParams::new(["q"], 8)).await?;
    assert_eq!(got.len(), 8);
    assert!(backend.renew_lease(got[0].lease()).await?);
    assert!(backend.ack(got[0].lease()).await?);
    assert!(
        backend
            .retry(got[1].lease(), RetryParams::new(std::time::Duration::ZERO))
            .await?
    );
    assert!(backend.dead_letter(got[2].lease(), "poison").await?);
    assert!(backend.release(got[3].lease()).await?);
    let rest: Vec<_> = got[4..].iter().map(Delivery::lease).collect();
    assert_eq!(backend.ack_batch(&rest).await?.len(), 4);
    let settled: HashSet<i64> = [got[0].id, got[2].id]
        .into_iter()
        .chain(rest.iter().map(|l| l.id))
        .collect();

    // A cooperative member takes one message.
    let me = Member::new("g", "m")?;
    backend.coop_register(&me, &["q".to_owned()]).await?;
    let held = backend
        .coop_receive(&CoopReceive::new(me.clone(), ["q"], 1))
        .await?;
    assert_eq!(held.len(), 1);
    assert!(backend.ack(held[0].lease()).await?);
    assert!(backend.coop_unregister(&me, Unregister::Fail).await?);

    // A Subscriber drains the rest.
    let (tx_ids, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |d: Delivery| {
        let _ = tx_ids.send(d.id);
        std::future::ready(Ok::<(), HandlerError>(()))
    };
    let options = SubscriberOptions::new(["q"])
        .min_fetch_interval(std::time::Duration::from_millis(20))
        .max_fetch_interval(std::time::Duration::from_millis(100));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let want: HashSet<i64> = published
        .iter()
        .copied()
        .filter(|id| !settled.contains(id) && *id != held[0].id)
        .collect();
    let mut seen = HashSet::new();
    while !want.is_subset(&seen) {
        let id = within("the subscriber to drain the queue", handled.recv())
            .await
            .expect("handler channel open");
        seen.insert(id);
    }
    within("shutdown", sub.shutdown()).await?;
    assert!(backend.messages(Some("q")).await?.is_empty());
    assert_eq!(backend.dead_letters(Some("q")).await?.len(), 1);
    backend.rotate().await?;

    // The journal: a writer and a tail.
    let w = BatchedJournalWriter::new(backend.clone(), "s", WriterOptions::default());
    let mut tail = snapshot_and_tail(backend.clone(), "s", 0, TailOptions::default()).await?;
    for seq in 1..=20 {
        w.record(seq, if seq == 20 { "done" } else { "delta" }, payload(seq))
            .await?;
    }
    let stats = w.close().await?;
    assert_eq!((stats.written, stats.dropped), (20, 0));
    let mut read = Vec::new();
    while let Some(event) = within("the tail to reach seq 20", tail.next()).await {
        read.push(event?.seq);
    }
    assert_eq!(read, (1..=20).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn every_path_works_through_pgbouncer_in_transaction_mode_postgres() -> Result<()> {
    let Some(base) = bouncer("POSTBOX_TEST_PGBOUNCER_TX") else {
        return Ok(());
    };
    let db = postbox::testkit::postgres().await?;
    let backend = through(&base, &db, true).await?;
    assert!(
        backend.engine().is_none(),
        "no session state behind a pooler"
    );
    every_path(backend).await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn every_path_works_through_pgbouncer_in_session_mode_postgres() -> Result<()> {
    let Some(base) = bouncer("POSTBOX_TEST_PGBOUNCER_SESSION") else {
        return Ok(());
    };
    let db = postbox::testkit::postgres().await?;
    every_path(through(&base, &db, false).await?).await?;
    db.close().await?;
    Ok(())
}
